"""Checks a composed config against what its code declares, before anything is built or loaded.

Every group node names a callable (`_target_`): its parameters are the node's keys, their annotations the
values' types (`int`, `float`: an int is a fine float, `bool`, `str`, `None`, `Literal[...]` for a closed set
of names, `list[...]`, unions) and `Annotated[int, Range(ge=1)]` a number's bounds. The plain nodes and keys
(`fl`, `seed`) are declared by the caller. Annotations are read with `inspect` and `typing.get_type_hints`; no
callable is called, so no data and no model loads. Metadata keys (`answers`) describe an option and reach no
callable: `make` instantiates a node without them.
"""
from __future__ import annotations

import collections.abc
import copy
import difflib
import functools
import inspect
import re
import sys
import types
import typing
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, is_dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf, flag_override

from celora.errors import UserError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # the checkout's conf/ (celora is installed with -e)
HYDRA_KEYS = ("_target_", "_partial_", "_convert_", "_recursive_", "_args_")
# What a model, dataset or task scores: label classes, or answer tokens (a causal LM). Each option declares it.
Answers = Literal["classes", "tokens"]
METADATA = {"answers": Answers}  # keys that describe an option and reach no callable
ANSWER_GROUPS = ("model", "dataset", "task")


@dataclass(frozen=True)
class Range:
    """A number's bounds, declared on a parameter: `limit: Annotated[int, Range(ge=1)] | None = None`."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def holds(self, x: float) -> bool:
        return ((self.ge is None or x >= self.ge) and (self.gt is None or x > self.gt)
                and (self.le is None or x <= self.le) and (self.lt is None or x < self.lt))

    def __str__(self) -> str:
        low = f"[{self.ge:g}" if self.ge is not None else f"({self.gt:g}" if self.gt is not None else None
        high = f"{self.le:g}]" if self.le is not None else f"{self.lt:g})" if self.lt is not None else None
        if low and high:
            return f"in {low}, {high}"
        if low:
            return f"{'>=' if low[0] == '[' else '>'} {low[1:]}"
        return f"{'<=' if high[-1] == ']' else '<'} {high[:-1]}" if high else ""


# ---------------------------------------------------------------- types: does a value fit, and how to say so


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def fits(value, t) -> bool:
    """Whether a config value (resolved; a node with `_target_` stands for what it builds) fits annotation `t`.
    What a config cannot hold (a class such as torch.dtype, built from a name by the code) is not judged here."""
    origin, args = get_origin(t), get_args(t)
    if origin is Annotated:
        base, *meta = args
        return fits(value, base) and all(m.holds(value) for m in meta if isinstance(m, Range) and _number(value))
    if origin in (Union, types.UnionType):
        return any(fits(value, a) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if t is None or t is type(None):
        return value is None
    if isinstance(value, DictConfig) and "_target_" in value:
        return t not in (bool, int, float, str) and origin not in (list, tuple, dict)  # checked on its own
    if t is bool:
        return isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if t is float:
        return _number(value)
    if t is str:
        return isinstance(value, str)
    if t in (list, tuple) or origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, list | tuple | ListConfig):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(fits(v, a) for v, a in zip(value, args))
        return not args or all(fits(v, args[0]) for v in value)
    if t is dict or origin in (dict, collections.abc.Mapping):
        return isinstance(value, dict | DictConfig)
    if t is collections.abc.Callable or origin is collections.abc.Callable:
        return False  # only a node with `_target_` (above) builds a callable
    return True


def describe(t) -> str:
    """What annotation `t` allows, as a user reads it: "an integer >= 1, or null", "one of mean, cls"."""
    origin, args = get_origin(t), get_args(t)
    if origin is Annotated:
        base, *meta = args
        bounds = " ".join(str(m) for m in meta if isinstance(m, Range))
        return f"{describe(base)} {bounds}".strip()
    if origin in (Union, types.UnionType):
        said = [describe(a) for a in args if a is not type(None)]
        return " or ".join(said) + (", or null" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(_typed(a) for a in args)
    if t is None or t is type(None):
        return "null"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
             tuple: "a list", dict: "a mapping ({key: value})"}
    if t in names:
        return names[t]
    if origin in (list, tuple, collections.abc.Sequence):
        return "a list" + (f", each {describe(args[0])}" if args and args[-1] is not Ellipsis and len(args) == 1
                           else "")
    if origin in (dict, collections.abc.Mapping):
        return names[dict]
    if t is collections.abc.Callable or origin is collections.abc.Callable:
        return "a node with a _target_"
    return f"a {getattr(t, '__name__', t)}"


def _typed(value) -> str:
    """A value as it is typed on the command line (null, true, fp32, 0.5)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_typed(v) for v in value) + "]"
    return str(value)


def _shown(value) -> str:
    """A value in a message: strings quoted (so 'ten' reads as the string it was parsed as), the rest as typed."""
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=False)
    return repr(value) if isinstance(value, str) else _typed(value)


def closest(word: str, candidates, cutoff: float = 0.6) -> str | None:
    """The candidate nearest `word` (a typo's likely meaning), or None."""
    found = difflib.get_close_matches(word, list(candidates), n=1, cutoff=cutoff)
    return found[0] if found else None


# ---------------------------------------------------------------- what a callable declares


@dataclass(frozen=True)
class Declared:
    """The keys a node may hold: its callable's parameters, their annotations and defaults."""

    name: str  # what the node builds, for messages (an import path)
    params: Mapping[str, inspect.Parameter]
    hints: Mapping[str, Any]
    open: bool  # the callable takes **kwargs: any other key goes there (e.g. a transformers config)

    @classmethod
    def of(cls, obj) -> Declared:
        sig = inspect.signature(obj)
        kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        params = {n: p for n, p in sig.parameters.items() if p.kind not in kinds}
        open_ = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
        name = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', obj)}".lstrip(".")
        return cls(name, params, _hints(obj, params), open_)

    def default(self, key: str):
        p = self.params.get(key)
        return inspect.Parameter.empty if p is None else p.default


def _hints(obj, params: Mapping[str, inspect.Parameter]) -> dict[str, Any]:
    """The parameters' annotations, resolved; one that does not resolve (a name imported for type checkers
    only) is left out, so its values are not judged."""
    func = obj.__init__ if isinstance(obj, type) else obj
    for source in ([obj] if is_dataclass(obj) else []) + [func]:
        try:
            hints = typing.get_type_hints(source, include_extras=True)
            return {k: v for k, v in hints.items() if k in params}
        except Exception:  # noqa: BLE001  (unresolvable names: resolve them one by one below)
            continue
    module = vars(sys.modules.get(getattr(obj, "__module__", ""), types.ModuleType("none")))
    out = {}
    for name, p in params.items():
        ann = p.annotation
        if isinstance(ann, str):
            try:
                ann = eval(ann, module)  # noqa: S307  (an annotation of celora's own code)
            except Exception:  # noqa: BLE001
                continue
        if ann is not inspect.Parameter.empty:
            out[name] = ann
    return out


@functools.lru_cache(maxsize=None)
def declared(target: str) -> Declared:
    """What the callable at import path `target` declares (imported, not called)."""
    return Declared.of(get_object(target))


# ---------------------------------------------------------------- the check


@dataclass(frozen=True)
class Problem:
    key: str | None  # the full key at fault; None: a combination of nodes
    message: str


def problems(cfg: DictConfig, plain: Mapping[str, Any]) -> list[Problem]:
    """Every key of `cfg` that its callable (or `plain`, for the top-level keys and plain nodes: an annotation,
    a class whose parameters are the node's keys, or None for a node not checked here) does not declare, or
    whose value does not fit its annotation; and model, dataset and task answering differently."""
    found: list[Problem] = []
    refs: dict[str, str] = {}  # key -> the key its value interpolates, whose own problem says it all
    for key in cfg:
        if key == "hydra":
            continue
        if key in plain:
            spec = plain[key]
            if spec is None:
                continue
            if isinstance(spec, type) and not _is_value_type(spec):
                _node(cfg[key], key, Declared.of(spec), found, refs)
            else:
                _value(cfg, key, key, spec, None, found, refs)
        elif _builds(cfg, key):
            _target_node(cfg[key], key, found, refs)
        else:
            hint = closest(str(key), list(plain) + [k for k in cfg if k != key])
            found.append(Problem(key, f"{key}={_shown(_raw(cfg, key))} is not a key of the config{_hint(hint)} "
                                      "(`python -m celora --help` lists the groups and the main keys)"))
    bad = {p.key for p in found}
    found = [p for p in found if refs.get(p.key) not in bad]
    mismatch = disagreement({g: cfg[g].answers for g in ANSWER_GROUPS if _answers(cfg, g)}, cfg)
    return found + ([Problem(None, mismatch)] if mismatch else [])


def node_problems(node: DictConfig, path: str, cls: type) -> list[Problem]:
    """The problems of a plain node `path` whose keys are the fields of `cls` (a dataclass), as `problems` finds
    them for the nodes of PLAIN: unknown keys, values of another type, `_target_` nodes inside checked too."""
    found: list[Problem] = []
    refs: dict[str, str] = {}
    _node(node, path, Declared.of(cls), found, refs)
    bad = {p.key for p in found}
    return [p for p in found if refs.get(p.key) not in bad]


def _builds(node: DictConfig, key) -> bool:
    """Whether node[key] is a node with a `_target_` (read without resolving or failing on a ??? value)."""
    child = node._get_node(key)
    return isinstance(child, DictConfig) and not child._is_none() and "_target_" in child


def _is_value_type(t) -> bool:
    return t in (bool, int, float, str, list, dict, tuple)


def _hint(name: str | None) -> str:
    return f"; did you mean {name}?" if name else ""


def _target_node(node: DictConfig, path: str, found: list[Problem], refs: dict[str, str]) -> None:
    target = node._target_
    try:
        spec = declared(target)
    except Exception as e:  # noqa: BLE001  (a typo in a YAML's _target_, a module that does not import)
        found.append(Problem(f"{path}._target_", f"{path}._target_={target} does not import ({type(e).__name__}: "
                                                 f"{e}); check the name in its YAML"))
        return
    _node(node, path, spec, found, refs)
    if not node.get("_partial_", False):  # a partial node gets the rest from the code that calls it
        for name, p in spec.params.items():
            if p.default is inspect.Parameter.empty and name not in node.keys():  # (`in` misses a ??? value)
                found.append(Problem(f"{path}.{name}", f"{path}.{name} is required by {_label(node, path)} "
                                                       f"({spec.name}): set it, e.g. +{path}.{name}=..."))


def _node(node: DictConfig, path: str, spec: Declared, found: list[Problem], refs: dict[str, str]) -> None:
    for key in node:
        if key in HYDRA_KEYS:
            continue
        full = f"{path}.{key}"
        if key in METADATA:
            _value(node, key, full, METADATA[key], None, found, refs)
        elif key in spec.params:
            _value(node, key, full, spec.hints.get(key, Any), spec.default(key), found, refs)
        elif _builds(node, key) and spec.open:
            _target_node(node[key], full, found, refs)
        elif not spec.open:
            hint = closest(str(key), spec.params)
            found.append(Problem(full, f"{full}={_shown(_raw(node, key))} is not a key of {_label(node, path)}"
                                       f"{_hint(f'{path}.{hint}' if hint else None)} ({spec.name} takes "
                                       f"{', '.join(spec.params) or 'no keys'})"))


def _raw(node: DictConfig, key) -> Any:
    """The value as written (an interpolation unresolved), for messages about the key itself."""
    child = node._get_node(key)
    return child._value() if child is not None else None


def _value(node: DictConfig, key, full: str, t, default, found: list[Problem], refs: dict[str, str]) -> None:
    if OmegaConf.is_missing(node, key):
        return  # `???`: validate reports it with the fix
    if OmegaConf.is_interpolation(node, key):
        m = re.fullmatch(r"\$\{([\w.]+)\}", str(_raw(node, key)))
        if m:
            refs[full] = m.group(1)
    try:
        value = node[key]
    except Exception as e:  # noqa: BLE001  (an interpolation that does not resolve)
        found.append(Problem(full, f"{full}={_raw(node, key)} does not resolve: {str(e).splitlines()[0]}"))
        return
    if isinstance(value, DictConfig) and "_target_" in value:
        _target_node(value, full, found, refs)
    if fits(value, t):
        return
    said = f"{full}={_shown(value)}"
    if refs.get(full):
        said = f"{full}={_raw(node, key)} (= {_shown(value)})"
    example = (f", e.g. {full}={_typed(default)}" if default not in (inspect.Parameter.empty, None)
               and fits(default, t) else "")
    found.append(Problem(full, f"{said} must be {describe(t)}{example}" + "".join(f": {n}" for n in _notes(t))))


def _notes(t) -> list[str]:
    """The strings an annotation carries in `Annotated[...]` (also in a union's members): added to a message."""
    if get_origin(t) is Annotated:
        return [m for m in get_args(t)[1:] if isinstance(m, str)]
    if get_origin(t) in (Union, types.UnionType):
        return [n for a in get_args(t) for n in _notes(a)]
    return []


# ---------------------------------------------------------------- options as the user types them


@functools.lru_cache(maxsize=None)
def options(group: str) -> dict[str, dict]:
    """conf/<group>/'s options (name -> its YAML's top-level keys), `tuned/celora` for one in a subfolder."""
    folder = CONF_DIR / group
    out = {}
    for path in sorted(folder.rglob("*.yaml")):
        try:
            body = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            body = {}
        out[path.relative_to(folder).with_suffix("").as_posix()] = body if isinstance(body, dict) else {}
    return out


def choice(cfg: DictConfig, group: str) -> str:
    """`group=option` as the user types it: Hydra's choice where it built this node, else the option under
    conf/<group>/ with the node's `_target_`, else the target's import path."""
    target = OmegaConf.select(cfg, f"{group}._target_", default=None)
    named = options(group)
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            name = HydraConfig.get().runtime.choices.get(group)
            if name in named and named[name].get("_target_") == target:
                return f"{group}={name}"
    except Exception:  # noqa: BLE001  (no Hydra run: the compose API, a test)
        pass
    same = [name for name, body in named.items() if body.get("_target_") == target]
    return f"{group}={same[0] if len(same) == 1 else target}"


def _label(node: DictConfig, path: str) -> str:
    """A node as the user chose it (model=tiny_llama) where it is a group's, else its key."""
    if "." not in path and (CONF_DIR / path).is_dir():
        return choice(node._get_root(), path)
    return path


def _answers(cfg: DictConfig, group: str) -> bool:
    node = cfg.get(group)
    return isinstance(node, DictConfig) and node.get("answers") in get_args(Answers)


def _either(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def answering(group: str, kind: str) -> list[str]:
    """The options of `group` whose YAML declares `answers: kind`."""
    return [name for name, body in options(group).items() if body.get("answers") == kind]


def disagreement(kinds: Mapping[str, str], cfg: DictConfig) -> str | None:
    """Model, dataset and task must agree on what an answer is (`kinds`: group -> classes | tokens); the message
    when they do not, each named as typed, with the options that agree with the model. None: they agree."""
    if len(set(kinds.values())) < 2:
        return None
    ref = kinds.get("model") or Counter(kinds.values()).most_common(1)[0][0]
    said = ", ".join(f"{choice(cfg, g)} answers in {k}" for g, k in kinds.items())
    fixes = []
    for group, kind in kinds.items():
        if kind != ref:
            names = answering(group, ref)
            fix = f"{group}={_either(names)}" if names else f"a {group} that answers in {ref}"
            if group == "task" and "model" in kinds:
                fix += " (or leave task= out: it follows from the model)"
            fixes.append(fix)
    return (f"{said}: they must agree (a classifier answers in classes, a causal LM in tokens: docs/llm.md); "
            f"use {' and '.join(fixes)}")


# ---------------------------------------------------------------- building a node


def make(node: DictConfig, **kwargs):
    """Hydra's `instantiate` of a group node without its metadata keys; a user's error the callable raises comes
    out as itself, not wrapped in Hydra's InstantiationException."""
    if isinstance(node, DictConfig) and any(k in node for k in METADATA):
        parent = node._get_parent()
        node = copy.deepcopy(node)
        node._set_parent(parent)  # interpolations into the rest of the config still resolve
        with flag_override(node, ["struct", "readonly"], [False, False]):
            for key in METADATA:
                node.pop(key, None)
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, UserError):
            cause.__suppress_context__ = True
            raise cause  # noqa: B904  (its own traceback; Hydra's wrapper adds nothing to a user's error)
        raise
