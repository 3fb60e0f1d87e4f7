"""The `--help` page of the entry points, read from conf/ and docs/ when it is shown: each config group with its
options and the first comment line of each option's YAML, the main keys of config.yaml, and the docs to read.

conf/config.yaml sets `hydra.help.template: ${celora_help:}`; `register()` (called by celora.cli before Hydra
starts) makes that resolver. Hydra substitutes `$NAME` in the template, so every `$` here is doubled.
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from celora.schema import CONF_DIR

ROOT = CONF_DIR.parent
PLAIN_NODES = ("fl", "client", "export")  # the nodes of config.yaml whose keys are listed (the rest: a group's option)
OPTION_GROUPS = ("dataset", "model", "task", "simulation", "server")  # the groups whose chosen option's commented keys are listed


def register(program: str = "python -m celora") -> None:
    OmegaConf.register_new_resolver("celora_help", lambda *, _root_: text(_root_, program).replace("$", "$$"),
                                    replace=True)


def text(root: DictConfig | None = None, program: str = "python -m celora") -> str:
    """The whole page; `root` (the composed config, Hydra's node included) marks the options it chose and gives
    the keys' values, else config.yaml's defaults are shown."""
    chosen = _choices(root)
    main, optional = groups()
    usage = [("[group=option ...] [key=value ...]", "one run (its dir: outputs/<date>/<time>)"),
             ("-m group=a,b key=1,2", "a sweep: one run per combination (multirun/...)"),
             ("+debug=tiny", "a seconds-long run on CPU"),
             ("--cfg job [overrides]", "the composed config, without running it")]
    width = max(len(f"  {program} {args}") for args, _ in usage) + 2
    lines = [
        "celora: federated fine-tuning of adapters (LoRA, CE-LoRA's tri-matrix and their baselines) on simulated",
        "clients, configured by Hydra: every group below is a swappable axis.",
        "",
        "Usage",
        *(f"  {program} {args}".ljust(width) + what for args, what in usage),
        "",
        "Config groups (group=option; * this config's choice)",
    ]
    for group in main:
        lines += _group(group, chosen.get(group))
    lines += ["", "Added with + (+group=option)"]
    for group in optional:
        lines += _group(group, None, plus=True)
    lines += ["", "Main keys (key=value; any key of an option can be set too, e.g. model.max_length=64)"]
    width = 34
    for key, value, comment in main_keys(root):
        setting = f"  {key}={value}"
        lines.append(f"{setting.ljust(width)} {comment}".rstrip() if len(setting) < width else
                     f"{setting}  {comment}".rstrip())
    chosen_keys = option_keys(chosen, root)
    if chosen_keys:
        lines += ["", f"Keys of this config's {', '.join(OPTION_GROUPS[:-1])} and {OPTION_GROUPS[-1]} options (e.g. model.quantize=nf4)"]
        for key, value, comment in chosen_keys:
            setting = f"  {key}={value}"
            lines.append(f"{setting.ljust(width)} {comment}".rstrip() if len(setting) < width else
                         f"{setting}  {comment}".rstrip())
    lines += ["", "Docs"]
    for path, title in docs():
        lines.append(f"  {path.ljust(26)} {title}")
    return "\n".join(lines) + "\n"


def groups() -> tuple[list[str], list[str]]:
    """(the groups config.yaml's defaults list chooses, in its order; the other groups, added with +group=).
    A group another primary config composes (conf/privacy_attack.yaml: attack, attack_case) is that script's."""
    defaults = _defaults(CONF_DIR / "config.yaml")
    main = [g for g in defaults if (CONF_DIR / g).is_dir()]
    scripts = {g for p in CONF_DIR.glob("*.yaml") if p.name != "config.yaml" for g in _defaults(p)}
    folders = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra")
    return main, [g for g in folders if g not in main and g not in scripts]


def _defaults(path: Path) -> list[str]:
    """The groups a primary config's defaults list names (`/adapter@victims.lora` names adapter)."""
    entries = (yaml.safe_load(path.read_text()) or {}).get("defaults", [])
    names = [next(iter(e)) for e in entries if isinstance(e, dict)]
    return [n.removeprefix("override ").lstrip("/").split("@")[0] for n in names]


def _group(group: str, chosen: str | None, plus: bool = False) -> list[str]:
    lines = [f"  {'+' if plus else ''}{group}"]
    folder = CONF_DIR / group
    for path in sorted(folder.glob("*.yaml")):
        mark = "*" if path.stem == chosen else " "
        lines.append(f"   {mark}{path.stem.ljust(20)} {description(path)}".rstrip())
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not _building_block(folder, p.name)):
        names = sorted(p.stem for p in sub.glob("*.yaml"))
        mark = "*" if chosen and chosen.startswith(f"{sub.name}/") else " "
        said = description(sub / f"{names[0]}.yaml").replace(names[0], "<name>", 1)  # one line for them all
        lines.append(f"   {mark}{(sub.name + '/<name>').ljust(20)} {said} ({', '.join(names)})")
    return lines


def _building_block(folder: Path, sub: str) -> bool:
    """A subfolder the group's options compose (conf/adapter/common: `common/low_rank@_here_`), not options."""
    return any(f"{sub}/" in p.read_text() for p in folder.glob("*.yaml"))


def description(path: Path) -> str:
    """The first sentence of an option's YAML's opening comment (not `# @package`), to its first clause if long."""
    said = []
    for ln in path.read_text().splitlines():
        if not ln.startswith("#") or "@package" in ln:
            if said:
                break
            continue
        text = ln[1:]
        if said and (not text.strip() or text.startswith("  ")):  # a blank or an indented example ends it
            break
        said.append(text.strip())
    return short(re.split(r"(?<!e\.g)(?<!i\.e)\.\s+", " ".join(said))[0])


def short(sentence: str, width: int = 100) -> str:
    """A sentence without its trailing `e.g.` or colon, at most `width` long: cut after its last whole clause
    that fits (at a colon or semicolon outside brackets), else after its last whole word."""
    sentence = re.sub(r",?\s*e\.g\.$", "", sentence.strip()).rstrip(".,;:")
    if len(sentence) <= width:
        return sentence
    depth, cut = 0, None
    for k, ch in enumerate(sentence[:width]):
        depth += (ch in "([{") - (ch in ")]}")
        if depth == 0 and k >= 40 and sentence[k:k + 2] in (": ", "; "):
            cut = k
    return sentence[:cut] if cut else sentence[:width].rsplit(" ", 1)[0] + " ..."


def main_keys(root: DictConfig | None = None) -> list[tuple[str, str, str]]:
    """(key, value, its comment) of config.yaml's top-level plain keys and of its PLAIN_NODES' keys, the values
    as `root` has them (unresolved) where given."""
    out, node = [], None
    comment_above = ""
    for line in (CONF_DIR / "config.yaml").read_text().splitlines():
        m = re.match(r"^(  )?(\w+):\s*([^#]*?)\s*(?:#\s*(.*))?$", line)
        if line.startswith("#"):
            comment_above = comment_above or line.lstrip("# ").strip()
            continue
        if not m:
            comment_above = ""
            continue
        nested, key, value, comment = m.groups()
        if not nested:
            node = key if not value else None
            if value and key != "defaults":
                out.append((key, value, short(comment or comment_above)))
        elif node in PLAIN_NODES and value and not key.startswith("_"):
            out.append((f"{node}.{key}", value, short(comment or "")))
        comment_above = ""
    if root is not None:
        out = [(key, _raw(root, key, value), comment) for key, value, comment in out]
    return out


def option_keys(chosen: dict[str, str], root: DictConfig | None = None) -> list[tuple[str, str, str]]:
    """(group.key, value, its comment) of every top-level key with a comment of the option `chosen` for each of
    OPTION_GROUPS (`answers`, metadata, and Hydra's `_partial_` and the like left out), the values as `root` has
    them where given."""
    out = []
    for group in OPTION_GROUPS:
        path = CONF_DIR / group / f"{chosen.get(group)}.yaml"
        if group not in chosen or not path.exists():
            continue
        for line in path.read_text().splitlines():
            m = re.match(r"^(\w+):\s*([^#]*?)\s*#\s*(.*)$", line)
            if m and m.group(1) != "answers" and not m.group(1).startswith("_"):
                out.append((f"{group}.{m.group(1)}", m.group(2), short(m.group(3))))
    if root is not None:
        out = [(key, _raw(root, key, value), comment) for key, value, comment in out]
    return out


def _raw(root: DictConfig, key: str, default: str) -> str:
    parent, _, last = key.rpartition(".")
    node = OmegaConf.select(root, parent) if parent else root
    if not isinstance(node, DictConfig) or last not in node:
        return default
    value = node._get_node(last)._value()
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def docs() -> list[tuple[str, str]]:
    """(path, title) of README.md and of every page under docs/."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    out = []
    for page in pages:
        if page.exists():
            title = next((ln.lstrip("# ").strip() for ln in page.read_text().splitlines() if ln.startswith("#")), "")
            if page == ROOT / "README.md":
                title = "start here: what celora is, the two commands, what comes out"
            out.append((page.relative_to(ROOT).as_posix(), title))
    return out


def _choices(root: DictConfig | None) -> dict[str, str]:
    """The option each group got: Hydra's record of this composition, else config.yaml's defaults list."""
    if root is not None:
        choices = OmegaConf.select(root, "hydra.runtime.choices")
        if isinstance(choices, DictConfig):
            return {k: v for k, v in choices.items() if isinstance(v, str)}
    entries = (yaml.safe_load((CONF_DIR / "config.yaml").read_text()) or {}).get("defaults", [])
    return {k: v for e in entries if isinstance(e, dict) for k, v in e.items() if isinstance(v, str)}
