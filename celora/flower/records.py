"""celora's wire as Flower records: a Payload travels as an ArrayRecord of its tensors' raw bytes at the wire dtype.

The bytes of each Array are the tensor's own (no header), so the record's data is exactly celora's
count (`Payload.nbytes`) and Flower's `ArrayRecord.count_bytes()` is that plus the names of the
tensors, which Flower counts too (`name_bytes`). Flower's NumPy serialisation is not used: it adds a
header to every array and has no bfloat16.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import Array, ArrayRecord

from celora.fl.wire import Payload
from celora.similarity import ClassStats

STYPE = "celora.raw"  # the tensor's bytes as laid out in memory (little-endian on every platform torch supports)
STATS = ("counts", "means", "vars")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"a received array has dtype {name!r}, which is not a torch dtype")
    return dtype


def to_array(t: torch.Tensor) -> Array:
    t = t.detach().to("cpu").contiguous()
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    return Array(dtype=str(t.dtype).removeprefix("torch."), shape=tuple(t.shape), stype=STYPE, data=data)


def from_array(a: Array) -> torch.Tensor:
    if a.stype != STYPE:
        raise ValueError(f"a received array is serialised as {a.stype!r}; celora's apps exchange {STYPE!r} arrays "
                         "(both ends must run celora.flower)")
    flat = torch.frombuffer(bytearray(a.data), dtype=_dtype(a.dtype)) if a.data else torch.empty(0, dtype=_dtype(a.dtype))
    return flat.reshape(a.shape).clone()


def to_record(payload: Payload) -> ArrayRecord:
    """The payload's tensors, already at the wire dtype, as one Array each under its parameter name."""
    return ArrayRecord({n: to_array(t) for n, t in payload.tensors.items()})


def from_record(record: ArrayRecord, dtypes: Mapping[str, torch.dtype], names: tuple[str, ...]) -> Payload:
    """The Payload a record carries; `names` are the tensors the exchange declares, `dtypes` the receiver's own
    dtypes of them (in which it holds them again)."""
    if set(record) != set(names):
        missing, extra = sorted(set(names) - set(record)), sorted(set(record) - set(names))
        raise ValueError(f"a received record does not carry this run's exchanged tensors (missing {missing[:3]}, "
                         f"unexpected {extra[:3]}): both ends must run the same config")
    return Payload({n: from_array(record[n]) for n in names}, {n: dtypes[n] for n in names})


def name_bytes(record: ArrayRecord) -> int:
    """What Flower's count_bytes adds to the tensor data: the bytes of the record's keys."""
    return sum(len(k) for k in record)


def state_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Tensors kept in a client's own context (never sent), in their own dtype."""
    return ArrayRecord({n: to_array(t) for n, t in state.items()})


def record_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {n: from_array(a) for n, a in record.items()}


def stats_record(stats: ClassStats, dtype: torch.dtype) -> ArrayRecord:
    """A client's data summary at the wire dtype: the bytes `ClassStats.nbytes` counts."""
    return ArrayRecord({k: to_array(getattr(stats, k).to(dtype)) for k in STATS})


def record_stats(record: ArrayRecord) -> ClassStats:
    return ClassStats(*(from_array(record[k]).double() for k in STATS))
