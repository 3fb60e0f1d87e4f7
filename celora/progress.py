"""Progress bars that share the terminal with the run's log lines, and a sweep's count of its jobs."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

try:  # the sweep's callback is Hydra's; the rest of this module is not
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra-core is a dependency
    Callback = object

log = logging.getLogger("celora")


def bar(total: int | None, desc: str, enabled: bool = True, unit: str = "it", leave: bool = False) -> tqdm:
    """A bar of `total` steps (rows, clients, rounds); off when not `enabled` (tests, Flower, the tiny configs).
    Inner bars (evaluation, data statistics) do not stay on screen when done: the round's log line says it."""
    return tqdm(total=total, desc=desc, disable=not enabled, unit=unit, leave=leave, dynamic_ncols=True)


@contextmanager
def logs_beside_bars() -> Iterator[None]:
    """While a run works: console log lines go through tqdm.write, so they print above the open bars instead
    of breaking them, and Python warnings (a library's, or `warnings.warn`) become log records of the
    `py.warnings` logger, so they reach the run's log file as well as the console."""
    logging.captureWarnings(True)
    try:
        with logging_redirect_tqdm():
            yield
    finally:
        logging.captureWarnings(False)


def sweep_size(overrides: list[str], params: dict | None = None) -> int | None:
    """How many jobs Hydra's basic sweeper makes of these overrides and `hydra.sweeper.params`: the product of
    each swept key's values (the command line's value of a key wins over params'); None if one cannot be
    counted (an interval or a sweeper's own search space)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = [f"{key}={value}" for key, value in (params or {}).items()] + list(overrides)
    by_key = {}
    for override in OverridesParser.create().parse_overrides(lines):
        by_key[override.get_key_element()] = override
    total = 1
    for override in by_key.values():
        if not override.is_sweep_override():
            continue
        if override.is_interval_sweep():
            return None
        total *= len(list(override.sweep_string_iterator()))
    return total


class SweepProgress(Callback):
    """A multirun's bar of finished jobs, and a log line at each job's start naming it (k of n, its overrides).

    Hydra calls it in the launching process for the basic launcher (jobs one after another); a launcher that
    runs jobs elsewhere (joblib, SLURM) still gets each job's log line, in that job's log."""

    def __init__(self):
        self.bar: tqdm | None = None
        self.total: int | None = None
        self.sweeping = False

    def __getstate__(self) -> dict:
        """What a launcher's worker process gets (joblib pickles the callbacks): the count, not the bar, which
        holds the terminal."""
        return {**self.__dict__, "bar": None}

    def on_multirun_start(self, config, **kwargs) -> None:
        sweeper = config.hydra.sweeper
        basic = str(sweeper.get("_target_", "")).endswith("BasicSweeper")
        self.total = sweep_size(list(config.hydra.overrides.task), sweeper.get("params")) if basic else None
        self.bar = bar(self.total, "sweep", unit="job", leave=True)
        self.sweeping = True

    def on_job_start(self, config, **kwargs) -> None:
        if not self.sweeping:  # a single run (Hydra calls this for it too): no sweep to count in
            return
        of = f"/{self.total}" if self.total else ""
        log.info("sweep job %d%s: %s", config.hydra.job.num + 1, of,
                 " ".join(config.hydra.overrides.task) or "(no overrides)")

    def on_job_end(self, config, job_return, **kwargs) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_multirun_end(self, config, **kwargs) -> None:
        if self.bar is not None:
            if self.bar.n == 0 and self.total:  # the jobs ran in a launcher's workers: the bar never heard of them
                self.bar.update(self.total)
            self.bar.close()
