"""The shell around every Hydra entry point (`python -m celora`, `python -m celora.flower`): a user's mistake (an
override Hydra cannot apply, a config or input error) ends in one message and exit code 2; a bug keeps its
traceback."""
from __future__ import annotations

import ast
import os
import re
import sys
from collections.abc import Callable, Iterator

from hydra.errors import (
    ConfigCompositionException,
    InstantiationException,
    MissingConfigException,
    OverrideParseException,
)
from omegaconf import DictConfig, OmegaConf

from celora.errors import UserError
from celora.help import register
from celora.schema import CONF_DIR, closest, declared, options

JOB_FAILED = "Error executing job with overrides: "  # what Hydra writes to stderr before re-raising a job's error
USER_EXIT = 2  # a usage error, as argparse exits


def main(hydra_main: Callable[[], object], config_name: str = "config", program: str = "python -m celora") -> None:
    """Runs a `@hydra.main` function on the command line's arguments; a user's mistake is printed as
    `celora: <message>` (with the overrides of the failed job in a sweep), anything else raised as it is."""
    register(program)  # conf/config.yaml's hydra.help.template: `--help` lists the groups, their options, the docs
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # Hydra re-raises instead of printing its own half traceback
    stderr = sys.stderr
    sys.stderr = held = _HoldJobLine(stderr)
    try:
        hydra_main()
    except Exception as e:
        message = user_message(e, sys.argv[1:], config_name)
        sys.stderr = stderr
        if message is None:
            held.release()
            raise
        job = held.job() if _multirun(sys.argv[1:]) else None
        if job:  # Hydra's basic launcher ran the whole sweep, then raised its first failure
            message = f"the job {job} failed (the sweep's other jobs ran; a failed one leaves failed.json): {message}"
        print(f"celora: {message}", file=stderr)
        sys.exit(USER_EXIT)
    finally:
        sys.stderr = stderr


class _HoldJobLine:
    """sys.stderr, holding back the line Hydra writes before it re-raises a failed job's error, until the error
    is known: a bug gets it back before its traceback, a user's mistake gets one message instead."""

    def __init__(self, stream):
        self.stream, self.held = stream, []

    def write(self, text: str) -> int:
        if text.startswith(JOB_FAILED):
            self.held.append(text)
            return len(text)
        return self.stream.write(text)

    def release(self) -> None:
        for text in self.held:
            self.stream.write(text)
        self.held.clear()

    def job(self) -> str | None:
        """The failed job's overrides, as typed (the first job Hydra reports: the one whose error it raises)."""
        if not self.held:
            return None
        try:
            overrides = ast.literal_eval(self.held[0][len(JOB_FAILED):].strip())
        except (ValueError, SyntaxError):
            return None
        return " ".join(overrides) if overrides else "(no overrides)"

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _multirun(argv: list[str]) -> bool:
    return "-m" in argv or "--multirun" in argv


def _overrides(argv: list[str]) -> list[str]:
    from hydra._internal.utils import get_args_parser

    try:
        return list(get_args_parser().parse_known_args(argv)[0].overrides)
    except SystemExit:  # argparse refused the flags: keep what looks like an override
        return [a for a in argv if "=" in a or a.startswith("~")]


def user_message(e: BaseException, argv: list[str], config_name: str = "config") -> str | None:
    """The one message a user's mistake gets (its notes, e.g. where failed.json is, on lines below it); None for
    a bug."""
    while isinstance(e, InstantiationException) and e.__cause__ is not None:
        e = e.__cause__
    if isinstance(e, UserError):
        return "\n".join([str(e).strip(), *getattr(e, "__notes__", [])])
    if isinstance(e, ConfigCompositionException | MissingConfigException | OverrideParseException):
        return override_problem(e, _overrides(argv), config_name)
    return None


def override_problem(e: Exception, overrides: list[str], config_name: str = "config") -> str:
    """What Hydra could not compose, said as the override the user typed: the key or option that does not
    exist, the closest one that does, and the fix."""
    text = str(e).strip()
    said = " ".join(line.strip() for line in text.splitlines()[:2])
    if isinstance(e, OverrideParseException):
        reason = text.splitlines()[0].strip()
        return (f"cannot read the override {getattr(e, 'override', '')!r}: {reason} (the syntax: "
                "https://hydra.cc/docs/advanced/override_grammar/basic/)")
    found = re.search(r"Could not (?:find|load) '([^']+)'", text)
    if found:
        group, _, option = found.group(1).rpartition("/")
        if group and (CONF_DIR / group).is_dir():
            names = list(options(group))
            typed = _typed(overrides, group) or f"{group}={option}"
            hint = closest(option, names)
            fix = typed.replace(option, hint, 1) if hint and option in typed else f"{group}={hint}"
            return (f"{typed}: conf/{group}/ has no option {option}" + (f"; did you mean {fix}?" if hint else "")
                    + f" ({group}: {', '.join(names)})")
        return said
    found = re.search(r"Could not override '([^']+)'", text)
    if found:
        return _unknown_key(found.group(1), overrides, config_name)
    found = re.search(r"An item is already at '([^']+)'", text)
    if found:
        typed = _typed(overrides, found.group(1)) or f"+{found.group(1)}=..."
        return f"{typed}: {found.group(1)} exists already; set it without the +: {typed.lstrip('+')}"
    return said


def _key_of(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0].split("@", 1)[0]


def _typed(overrides: list[str], key: str) -> str | None:
    return next((o for o in overrides if _key_of(o) == key), None)


def _unknown_key(key: str, overrides: list[str], config_name: str) -> str:
    typed = _typed(overrides, key) or f"{key}=..."
    cfg = _composed([o for o in overrides if o != typed], config_name)
    paths = list(_paths(cfg)) if cfg is not None else []
    groups = [p.name for p in CONF_DIR.iterdir() if p.is_dir()]
    parent = key.rpartition(".")[0]
    siblings = [p for p in paths if p.rpartition(".")[0] == parent]
    hint = closest(key, siblings) or closest(key, paths + groups)
    said = [f"{typed}: the config has no key {key}"]
    if hint:
        said.append(f"did you mean {typed.replace(key, hint, 1).lstrip('+')}?")
    node = OmegaConf.select(cfg, parent, default=None) if cfg is not None and parent else None
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    try:
        takes_more = bool(target) and declared(target).open
    except Exception:  # noqa: BLE001  (a target that does not import: schema says so when the run starts)
        takes_more = False
    if takes_more:  # e.g. model.num_hidden_layers: a key the loader passes on (**config)
        said.append(f"to pass a new key to {target}, add it: +{typed.lstrip('+')}")
    return "; ".join(said) + " (`python -m celora --help` lists the groups and the main keys)"


def _composed(overrides: list[str], config_name: str) -> DictConfig | None:
    """The config without the failed override (or with none), whose keys a typo is compared with."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    for attempt in (overrides, []):
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
                return compose(config_name, overrides=attempt)
        except Exception:  # noqa: BLE001  (another bad override, a sweep's a,b values: try without them)
            continue
    return None


def _paths(node: DictConfig, prefix: str = "") -> Iterator[str]:
    """Every key of `node`, dotted, nodes and leaves, without resolving a value."""
    for key in node:
        path = f"{prefix}{key}"
        yield path
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none():
            yield from _paths(child, path + ".")
