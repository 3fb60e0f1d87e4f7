"""How a pass over clients is grouped: one client at a time on the model's own tensors, or K clients stacked."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from torch import nn

from celora.adapters import stacked
from celora.data.batches import Collate, Encoded
from celora.errors import ConfigError
from celora.fl.client import Fitting, train_cohort, train_local
from celora.fl.evaluation import Advance, evaluate, evaluate_cohort
from celora.tensors import State, load, snapshot


def check_cohort_size(cohort_size) -> None:
    if not (cohort_size is None or cohort_size == "all" or
            (isinstance(cohort_size, int) and not isinstance(cohort_size, bool) and cohort_size >= 1)):
        raise ConfigError(f"simulation.cohort_size must be a positive integer or 'all', got {cohort_size!r}")


class OneByOne:
    """Sequential simulation: each client trains and is evaluated alone, on the model's own tensors."""

    def groups(self, ids: Sequence[int]) -> list[list[int]]:
        return [[i] for i in ids]

    def train(self, model: nn.Module, trainable: Sequence[str], starts: Sequence[State], loaders: Sequence[Iterable],
              steps: Sequence[int], fitting: Fitting, pad_id: int,
              on_first_backward: Callable | None = None) -> list[tuple[float, State]]:
        load(model, starts[0])
        loss = train_local(model, trainable, loaders[0], fitting, on_first_backward)
        return [(loss, snapshot(model, trainable))]

    def evaluate(self, model: nn.Module, fitting: Fitting, data: Encoded, states: Sequence[State],
                 indices: Sequence[Sequence[int]], batch_size: int, collate: Collate,
                 advance: Advance | None = None) -> list[dict[str, float]]:
        load(model, states[0])
        return [evaluate(model, data, indices[0], batch_size, collate, fitting.task, fitting.engine, advance)]


class Stacked(OneByOne):
    """Parallel simulation: K clients (or "all" of a pass) at once, their trainable tensors stacked along a
    leading client dim (adapters.stacked) over the one shared backbone."""

    def __init__(self, size: int | str):
        self.size = size

    def groups(self, ids: Sequence[int]) -> list[list[int]]:
        k = len(ids) if self.size == "all" else self.size
        return [list(ids[j:j + k]) for j in range(0, len(ids), k)]

    def train(self, model, trainable, starts, loaders, steps, fitting, pad_id, on_first_backward=None):
        losses, states = train_cohort(model, trainable, starts, loaders, steps, fitting, pad_id, on_first_backward)
        return list(zip(losses, states))

    def evaluate(self, model, fitting, data, states, indices, batch_size, collate, advance=None):
        with stacked(model, states):
            return evaluate_cohort(model, data, indices, batch_size, collate, fitting.task, fitting.engine, advance)


def plan(cohort_size: int | str | None) -> OneByOne:
    """simulation.cohort_size: null one by one, K or "all" stacked."""
    check_cohort_size(cohort_size)
    return OneByOne() if cohort_size is None else Stacked(cohort_size)
