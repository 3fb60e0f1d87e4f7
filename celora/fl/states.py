"""Every model of a run in one place: the server's global state, each client's last personalised state, the private tensors."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from celora.tensors import State


class ModelStates:
    """The one home of every client's model; evaluation, checkpoints, the Flower apps and export read it here.

    A client's model is what it last received (its personalised state where the server keeps one,
    else the global state) plus the private tensors of the trainer that holds them. Trainers are the
    clients themselves, or, for the centralized reference, one trainer on the pooled rows whose
    tensors are every client's model (`owner` maps each client to its trainer).
    """

    def __init__(self, shared: State, private: State, owner: Sequence[int], pooled: bool = False):
        self.global_state: State = dict(shared)  # the server's model of the shared tensors
        self.personal: dict[int, State] = {}  # client -> what the server last sent it of its own (personalised)
        self.owner = list(owner)  # client -> the trainer that holds its private tensors
        self.private: list[State] = [dict(private) for _ in range(max(self.owner, default=-1) + 1)]
        self.private_names = tuple(private)
        self.pooled = pooled  # one trainer holds every client's model (the centralized reference)

    # -- reading -------------------------------------------------------------------------------
    def received(self, i: int) -> State:
        """What client i is sent (and last received): its personalised state where the server keeps one, else
        the global state."""
        return self.personal.get(i, self.global_state)

    def own(self, i: int) -> State:
        """Client i's private tensors (those of the trainer that holds them)."""
        return self.private[self.owner[i]]

    def of(self, i: int) -> State:
        """Client i's own model: what it last received and its private tensors."""
        return {**self.received(i), **self.own(i)}

    def global_model(self) -> State | None:
        """The one model everybody shares, where there is one: the global state when nothing trained stays
        private, the pooled trainer's tensors for the centralized reference, else None."""
        if self.pooled:
            return self.private[0]
        return None if self.private_names else self.global_state

    # -- writing -------------------------------------------------------------------------------
    def aggregated(self, global_state: State | None, personal: Mapping[int, State]) -> None:
        """The server's result of a round: a new global state (None keeps the old one: nothing shared) and the
        personalised states of the clients it mixed for (the others keep theirs)."""
        if global_state is not None:
            self.global_state = global_state
        self.personal.update(personal)

    def trained(self, trainer: int, private: State) -> None:
        """A trainer keeps what it trained of its private tensors (a rejected result is never passed here)."""
        self.private[trainer] = private

    # -- checkpoints: the same keys as before this object existed, so older checkpoints load -----------
    def state_dict(self) -> dict:
        return {"global": self.global_state, "personal": self.personal, "private": self.private}

    def load_state_dict(self, state: dict) -> None:
        self.global_state = state["global"]
        self.personal = dict(state["personal"])
        self.private = list(state["private"])

    def tensors(self, state: dict) -> list[State]:
        """Every state of a checkpoint's `state_dict`, to check their shapes against the model."""
        return [state["global"], *state["personal"].values(), *state["private"]]
