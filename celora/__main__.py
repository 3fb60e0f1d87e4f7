"""Command line: `python -m celora [hydra overrides]` (or `celora ...`); a thin shell around run()."""
import hydra
from omegaconf import DictConfig

from celora import cli


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def job(cfg: DictConfig) -> float | None:
    from celora.metrics import objective
    from celora.run import (
        run,  # imported in the job: a launcher process (joblib, submitit) stays light
    )

    return objective(run(cfg), cfg.get("optimized_metric"))  # what a sweeper optimises


def main() -> None:
    """A user's mistake in one line (exit code 2), a bug with its traceback: celora.cli."""
    cli.main(job)


if __name__ == "__main__":
    main()
