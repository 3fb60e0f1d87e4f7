"""Round checkpoints on disk: atomic writes, a checksum in each file, the last two kept, fallback on corruption."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from celora.files import atomic_write

log = logging.getLogger("celora")

MAGIC = b"CELORA-CKPT-1\n"  # format tag; the sha256 of the payload follows, then the payload (torch.save)
DIGEST = 32
KEEP = 2  # the current checkpoint and the previous one, should the current be unreadable
NAME = re.compile(r"round_(\d+)\.pt")


class CheckpointError(RuntimeError):
    """Checkpoints exist but none of them can be read."""


def path_of(directory: Path, rnd: int) -> Path:
    return Path(directory) / f"round_{rnd:05d}.pt"


def rounds(directory: Path) -> list[int]:
    """Rounds that have a checkpoint file in `directory`, newest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = (NAME.fullmatch(p.name) for p in directory.iterdir())
    return sorted((int(m.group(1)) for m in found if m), reverse=True)


def encode(payload: dict) -> bytes:
    """The file's bytes: MAGIC, sha256(body), body = torch.save(payload)."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    return MAGIC + hashlib.sha256(body).digest() + body


def decode(data: bytes) -> dict:
    """The payload of a checkpoint file's bytes; ValueError says why they are not a whole checkpoint."""
    head = len(MAGIC) + DIGEST
    if len(data) < head or not data.startswith(MAGIC):
        raise ValueError(f"not a celora checkpoint or cut short ({len(data)} bytes)")
    digest, body = data[len(MAGIC):head], data[head:]
    if hashlib.sha256(body).digest() != digest:
        raise ValueError("checksum mismatch (truncated or corrupted)")
    # Only tensors and plain Python types inside: nothing in a checkpoint can run code on load.
    return torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)


def save(directory: Path, rnd: int, payload: dict, keep: Iterable[int] = ()) -> Path:
    """Writes round `rnd`'s checkpoint atomically, then deletes all but the newest KEEP and the rounds in `keep`
    (the run's best round, which `python -m celora.export --round best` reads)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = path_of(directory, rnd)
    atomic_write(path, encode(payload))
    kept = set(keep)
    for old in rounds(directory)[KEEP:]:
        if old not in kept:
            path_of(directory, old).unlink(missing_ok=True)
    return path


def load_latest(directory: Path) -> dict | None:
    """The newest readable checkpoint's payload; None when there is none at all.

    An unreadable newer file is skipped with a warning (the previous round's is used); if every
    file is unreadable, CheckpointError names each one and why."""
    problems = []
    for rnd in rounds(directory):
        path = path_of(directory, rnd)
        try:
            payload = decode(path.read_bytes())
        except Exception as e:  # a bad file of any kind is only a reason to try the previous one
            problems.append(f"{path.name}: {e}")
            continue
        if problems:
            log.warning("skipped unreadable checkpoint(s) %s; resuming from %s (round %d)", "; ".join(problems),
                        path.name, rnd)
        return payload
    if problems:
        raise CheckpointError(f"no usable checkpoint in {directory}: {'; '.join(problems)}. "
                              "Start the run over with resume=never (or another run dir).")
    return None


def clear(directory: Path) -> None:
    """Removes every checkpoint (a run that starts over must never resume an older run's state)."""
    for rnd in rounds(directory):
        path_of(directory, rnd).unlink(missing_ok=True)


# -- the config a checkpoint belongs to -------------------------------------------------------
def flatten(tree, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists are values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) and value else
                   {f"{prefix}{key}": value})
    return out


def fingerprint(config: dict) -> str:
    """sha256 of the config as canonical JSON."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


UNSET = "<unset>"


def differences(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(dotted key, old value, new value) for every key whose value differs (absent: '<unset>')."""
    a, b = flatten(old), flatten(new)
    return [(k, a.get(k, UNSET), b.get(k, UNSET)) for k in sorted(set(a) | set(b))
            if a.get(k, UNSET) != b.get(k, UNSET)]


@dataclass(frozen=True)
class Before:
    """What a run made before a key existed did, where that is not the key's default: it ran as if the key were
    `value`, or, while the key `inert_while_null` is null, the key changed nothing at all."""

    value: object
    inert_while_null: str | None = None


# Keys whose default is not the behaviour from before them (docs/extending.md asks otherwise; these are the
# declared exceptions). A config saved before such a key existed is the same run only under the old value.
BEFORE = {
    # The data statistics' noise was the classic Gaussian mechanism's; analytic, the new default, adds less
    # (and is a proof at every epsilon). Without DP (dp_epsilon null) no noise is drawn and the key is inert.
    "aggregator.data_stats.dp_mechanism": Before("classic", inert_while_null="aggregator.data_stats.dp_epsilon"),
}


def added_keys(old: dict, new: dict, default: Callable[[str], object] | None = None) -> list[str] | None:
    """The keys `new` has and `old` lacks when that is all they differ in (else None; [] when equal). A run made
    before those keys existed is the same run: a key added to the config keeps, at its default, the behaviour
    from before it (docs/extending.md), so a finished or checkpointed run outlives the code growing a key.

    `default(key)` is the default the code declares for a key (UNSET where it declares none): a key counts as
    added only at that value. A key the user added (`+model.hidden_size=64`, passed on to a transformers
    config) declares no default, so it is a change, and another run.

    A key in BEFORE counts as added only at the value it had before it existed (or while the key that switches
    it on is null in `new`); any other value is a changed value (None). The switch is there so the rule can be
    honest without being blunt: applied on the key alone, every CE-LoRA run without DP kept in docs/results/
    (dp_epsilon null: the mechanism draws nothing) would count as another run and be trained again, while
    only runs with dp_epsilon set drew noise that the new default changes."""
    flat = flatten(new)

    def as_before(key: str, was, now) -> bool:
        if was != UNSET:
            return False
        before = BEFORE.get(key)
        if before is not None:
            return now == before.value or (before.inert_while_null is not None
                                           and flat.get(before.inert_while_null) is None)
        return default is None or now == default(key)

    diff = differences(old, new)
    return [key for key, _, _ in diff] if all(as_before(*d) for d in diff) else None
