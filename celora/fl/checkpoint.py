"""Round checkpoints on disk: atomic writes, a checksum in each file, the last two kept, fallback on corruption."""
from __future__ import annotations

import hashlib
import io
import json
import re
import warnings
from pathlib import Path

import torch

from celora.files import atomic_write

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


def save(directory: Path, rnd: int, payload: dict) -> Path:
    """Writes round `rnd`'s checkpoint atomically, then deletes all but the newest KEEP."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = path_of(directory, rnd)
    atomic_write(path, encode(payload))
    for old in rounds(directory)[KEEP:]:
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
            warnings.warn(f"skipped unreadable checkpoint(s) {'; '.join(problems)}; resuming from {path.name} "
                          f"(round {rnd})")
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


def added_keys(old: dict, new: dict) -> list[str] | None:
    """The keys `new` has and `old` lacks when that is all they differ in (else None; [] when equal). A run made
    before those keys existed is the same run: a key added to the config keeps, at its default, the behaviour
    from before it (docs/extending.md), so a finished or checkpointed run outlives the code growing a key."""
    diff = differences(old, new)
    return [key for key, _, _ in diff] if all(was == UNSET for _, was, _ in diff) else None
