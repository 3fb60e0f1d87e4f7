"""Adapter declaration: factor shapes, initialisation and the exchange rule (trained / sent / private)."""
from __future__ import annotations

from dataclasses import dataclass, field

from celora.errors import ConfigError

FACTORS = ("A", "B", "C")
HEAD_POLICIES = ("shared", "local")
INITS = ("random", "svd", "lora_sb")


@dataclass
class AdapterConfig:
    """One adapter method, as data.

    `trainable` factors are optimised locally; of those, `shared` ones are uploaded and
    aggregated, the rest stay private on the client. Factors that are not trainable are
    frozen and identical on every client (seeded random or from W0's SVD).
    """

    name: str = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] | None = None  # None: the model family's default targets
    init: str = "random"  # random | svd (from W0, tri) | lora_sb (Fed-SB: from round 0's mean gradient, tri)
    zero: str = "B"  # the factor that starts at zero, so round 0 is the pretrained model; C: a tri adapter
    trainable: list[str] = field(default_factory=lambda: ["A", "B"])
    shared: list[str] = field(default_factory=lambda: ["A", "B"])
    head: str = "shared"  # shared: the task head is uploaded and aggregated; local: kept private

    def __post_init__(self) -> None:
        self.trainable = list(self.trainable)
        self.shared = list(self.shared)
        if self.targets is not None:
            self.targets = list(self.targets)
        if self.zero not in FACTORS:
            raise ConfigError(f"adapter.zero={self.zero!r} is not a factor; use B (LoRA: B A) or C (tri: B C A)")
        factors = set(FACTORS if self.tri else FACTORS[:2])
        if self.r < 1:
            raise ConfigError(f"adapter.r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"adapter.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"adapter.dropout must be in [0, 1), got {self.dropout}")
        if self.init not in INITS:
            raise ConfigError(f"adapter.init must be one of {INITS}, got {self.init!r}")
        if self.init == "lora_sb" and not (self.tri and self.trainable == ["C"]):
            raise ConfigError("adapter.init=lora_sb (Fed-SB) derives the frozen A and B of a tri adapter from round 0's "
                             f"gradients, but this adapter is {'a tri one training ' + str(self.trainable) if self.tri else 'not tri'}; "
                             "use adapter=tri (trainable: [C]) or method=fed_sb")
        if self.head not in HEAD_POLICIES:
            raise ConfigError(f"adapter.head must be one of {HEAD_POLICIES}, got {self.head!r}")
        for key in ("trainable", "shared"):
            bad = set(getattr(self, key)) - factors
            if bad:
                raise ConfigError(
                    f"adapter.{key} names {sorted(bad)}, but this adapter has factors {sorted(factors)}"
                    + ("" if self.tri else " (C exists in a tri adapter: adapter.zero=C)")
                )
        if not self.trainable:
            raise ConfigError("adapter.trainable is empty: nothing would learn")
        if not set(self.shared) <= set(self.trainable):
            raise ConfigError(
                f"adapter.shared={self.shared} must be a subset of adapter.trainable={self.trainable}: "
                "frozen factors are identical everywhere and never sent"
            )
        if self.zero not in self.trainable:
            raise ConfigError(
                f"adapter.zero={self.zero!r} starts at zero but is frozen, so the adapter could never "
                f"learn (its gradient through the other factors is zero); make it trainable"
            )
    @property
    def tri(self) -> bool:
        """A tri adapter (B C A) is the one whose C starts at zero, so that A and B can be non-zero and frozen."""
        return self.zero == "C"

    @property
    def private(self) -> list[str]:
        return [f for f in self.trainable if f not in self.shared]
