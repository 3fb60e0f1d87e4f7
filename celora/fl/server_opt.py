"""Server optimizers (Reddi et al., "Adaptive Federated Optimization", ICLR 2021): the round's aggregate taken as a
pseudo-gradient and stepped with SGD, momentum (FedAvgM), Adagrad, Adam or Yogi. Pure: the moments go in and out.

A round's pseudo-gradient of a stream (the global model, or under a personalised aggregator each client's own
model) is delta = aggregate - base: the aggregate the server's aggregator computed minus what the round's
clients started from (what they were sent). With m and v the stream's moments (m = 0 and v = tau^2 before its
first round, as Reddi et al.'s Algorithm 2 initialises them), the new model is

    sgd       x + eta delta                                  (eta = 1: FedAvg, within rounding)
    momentum  m = beta1 m + delta;        x + eta m          (FedAvgM, Hsu et al. 2019)
    adagrad   m = beta1 m + (1 - beta1) delta, v = v + delta^2;                         x + eta m / (sqrt(v) + tau)
    adam      m as adagrad, v = beta2 v + (1 - beta2) delta^2;                          x + eta m / (sqrt(v) + tau)
    yogi      m as adagrad, v = v - (1 - beta2) delta^2 sign(v - delta^2);              x + eta m / (sqrt(v) + tau)

element-wise, computed in float64 and stored back in the model's dtype; the moments stay float64. There is no
bias correction (the paper's algorithms have none). Nothing here is sent: a server optimizer costs no byte.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Annotated, Literal, get_args

import torch

from celora.errors import ConfigError
from celora.fl.aggregators import Aggregate
from celora.fl.states import ModelStates
from celora.schema import Range
from celora.tensors import State

Rule = Literal["sgd", "momentum", "adagrad", "adam", "yogi"]
RULES = get_args(Rule)
ADAPTIVE = ("adagrad", "adam", "yogi")
Moments = dict[str, State]  # "m" (and "v" for the adaptive rules): one float64 tensor per key of the stream


@dataclass
class ServerOptimizer:
    """`server.*`: how the server turns a round's aggregate into its new model. optimizer=null (the default) takes
    the aggregate as it is: FedAvg's own code path, untouched."""

    optimizer: Rule | None = None
    eta: Annotated[float, Range(gt=0)] = 1.0  # the server's learning rate
    beta1: Annotated[float, Range(ge=0, lt=1)] = 0.9  # momentum: its factor; adaptive rules: the first moment's decay
    beta2: Annotated[float, Range(ge=0, lt=1)] = 0.99  # adam and yogi: the second moment's decay
    tau: Annotated[float, Range(gt=0)] = 1e-3  # adaptive rules: the degree of adaptivity (added to sqrt(v))

    def __post_init__(self):
        if self.optimizer is not None and self.optimizer not in RULES:
            raise ConfigError(f"server.optimizer must be null (the aggregate as it is) or one of {', '.join(RULES)}, "
                              f"got {self.optimizer!r}")
        if not self.eta > 0:
            raise ConfigError(f"server.eta (the server's learning rate) must be > 0, got {self.eta}")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"server.{key} must be in [0, 1), got {getattr(self, key)}; e.g. 0.9 (beta1), "
                                  "0.99 (beta2)")
        if not self.tau > 0:
            raise ConfigError(f"server.tau (added to sqrt(v): the adaptivity) must be > 0, got {self.tau}; e.g. 1e-3")

    @property
    def active(self) -> bool:
        return self.optimizer is not None

    @property
    def stateful(self) -> bool:
        return self.optimizer not in (None, "sgd")

    def step(self, x: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor],
             moments: Moments | None = None) -> tuple[State, Moments]:
        """One server step of a stream: (its new model, its new moments) from its model x, the round's
        pseudo-gradient delta and its moments (None: before its first round)."""
        if self.optimizer is None:
            raise ValueError("server.optimizer is null: the aggregate is taken as it is, there is no step")
        d = {k: delta[k].double() for k in x}
        if self.optimizer == "sgd":
            return {k: (x[k].double() + self.eta * d[k]).to(x[k].dtype) for k in x}, {}
        m_old = moments.get("m") if moments else None
        m_old = m_old or {k: torch.zeros_like(d[k]) for k in x}
        if self.optimizer == "momentum":
            m = {k: self.beta1 * m_old[k] + d[k] for k in x}
            return {k: (x[k].double() + self.eta * m[k]).to(x[k].dtype) for k in x}, {"m": m}
        v_old = moments.get("v") if moments else None
        v_old = v_old or {k: torch.full_like(d[k], self.tau ** 2) for k in x}
        m = {k: self.beta1 * m_old[k] + (1 - self.beta1) * d[k] for k in x}
        sq = {k: d[k] * d[k] for k in x}
        if self.optimizer == "adagrad":
            v = {k: v_old[k] + sq[k] for k in x}
        elif self.optimizer == "adam":
            v = {k: self.beta2 * v_old[k] + (1 - self.beta2) * sq[k] for k in x}
        else:  # yogi
            v = {k: v_old[k] - (1 - self.beta2) * sq[k] * torch.sign(v_old[k] - sq[k]) for k in x}
        new = {k: (x[k].double() + self.eta * m[k] / (v[k].sqrt() + self.tau)).to(x[k].dtype) for k in x}
        return new, {"m": m, "v": v}


def pseudo_gradient(aggregate: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> State:
    """The round's delta of a stream: the aggregate minus what its clients started from, key by key (float64)."""
    return {k: aggregate[k].double() - base[k].double() for k in aggregate}


GLOBAL = "global"  # the stream of the server's global model


def server_step(opt: ServerOptimizer, result: Aggregate, states: ModelStates, received: Mapping[int, State],
                moments: Mapping) -> tuple[Aggregate, dict]:
    """The aggregator's result of a round stepped by the server optimizer: (the result the server keeps, the new
    moments of every stream). Pure: nothing of `states` or `moments` is changed.

    Streams: the global model, whose base is what the round's clients were sent (every client receives the
    one global state) or, under a personalised aggregator, the server's previous global state (no client
    started from it); and, under a personalised aggregator, each mixed client's own model, whose base is what
    that client received and whose pseudo-gradient is its mix minus that (CE-LoRA: C~_i - C_i^sent). A
    client's stream starts at its first mix; clients not mixed this round keep their model and moments."""
    out = dict(moments)
    base = states.global_state if result.personal else received[min(received)]
    new_global, out[GLOBAL] = opt.step(states.global_state, pseudo_gradient(result.global_state, base),
                                       moments.get(GLOBAL))
    personal = {}
    for i, mixed in result.personal.items():  # a client mixed but not sampled (a group's): from what it holds
        base_i = received[i] if i in received else states.received(i)
        personal[i], out[i] = opt.step(states.received(i), pseudo_gradient(mixed, base_i), moments.get(i))
    return replace(result, global_state=new_global, personal=personal), out
