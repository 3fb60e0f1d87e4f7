"""How a client sees its rows: its labels permuted (concept shift), Gaussian noise on its images, its images rotated.

A partition may give each client a `View` (celora.data.partition: concept_shift, feature_noise,
rotation_groups). `Viewed` lays every client's view of the rows side by side as one dataset: row
`client * n + r` is row r as client `client` sees it, so a client's row numbers are its raw ones plus
`client * n` and everything that reads rows (batches, stacked cohorts, evaluation, data summaries) reads
a client's own view without knowing of it. Without a view nothing is wrapped: the rows are the raw ones.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from celora.seeds import FEATURE_NOISE, derive_seed


@dataclass(frozen=True)
class View:
    """One client's (or one latent group's) view of the rows.

    label_map[c]: the label it sees for class c (None: as they are); noise_std: the std of the Gaussian noise
    added to its images, on the [0, 1] pixel scale, drawn once per (client, row) from `noise_seed`; angle:
    its images rotated counter-clockwise by this many degrees (a multiple of 90: exact, no interpolation)."""

    label_map: tuple[int, ...] | None = None
    noise_std: float = 0.0
    angle: int = 0
    noise_seed: int = 0

    @property
    def plain(self) -> bool:
        return self.label_map is None and self.noise_std == 0 and self.angle % 360 == 0

    @property
    def images_only(self) -> bool:
        return self.noise_std != 0 or self.angle % 360 != 0

    def truth(self) -> dict:
        """What partition.json records of it."""
        return {"label_map": None if self.label_map is None else list(self.label_map), "noise_std": self.noise_std,
                "angle": self.angle}

    def label(self, y: int) -> int:
        return y if self.label_map is None else self.label_map[y]

    def pixels(self, x: torch.Tensor, row: int) -> torch.Tensor:
        """An image (C, H, W), uint8 or float on the 0..255 scale, as this view shows it (float where noisy)."""
        if self.angle % 360:
            x = torch.rot90(x, self.angle // 90, dims=(-2, -1))
        if self.noise_std:
            gen = torch.Generator().manual_seed(derive_seed(self.noise_seed, FEATURE_NOISE, row))
            x = x.float() + 255.0 * self.noise_std * torch.randn(x.shape, generator=gen)
        return x


class Viewed(torch.utils.data.Dataset):
    """Every view of `data` side by side: row `v * len(data) + r` is row r as view v shows it."""

    def __init__(self, data, views: Sequence[View]):
        self.data, self.views, self.n = data, list(views), len(data)

    def __len__(self) -> int:
        return self.n * len(self.views)

    def rows(self, view: int, rows: Sequence[int]) -> np.ndarray:
        """View `view`'s row numbers of raw rows `rows`."""
        return np.asarray(rows, dtype=np.int64) + view * self.n

    def __getitem__(self, i: int):
        v, r = divmod(int(i), self.n)
        view, row = self.views[v], self.data[r]
        if view.plain:
            return row
        first = view.pixels(row[0], r) if view.images_only else row[0]
        return (first, view.label(row[1]), *row[2:])

    @functools.cached_property
    def classes(self) -> list[int]:
        """Each row's class as its view sees it (what the data summaries group by), built once."""
        raw = self.data.classes
        return [view.label(y) for view in self.views for y in raw]

    def lengths(self, indices: Sequence[int]) -> np.ndarray:
        return self.data.lengths(np.asarray(indices, dtype=np.int64) % self.n)

    def __getattr__(self, name: str):  # the rest of the data's interface (e.g. an instruct dataset's options)
        if name in ("data", "views", "n"):
            raise AttributeError(name)
        return getattr(self.data, name)
