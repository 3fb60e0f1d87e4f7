"""`python -m celora.flower <overrides>`: a celora run in Flower's Simulation Runtime (Ray) on this machine.

The config is the one `python -m celora <overrides>` composes (plus `flower.*`); one virtual
SuperNode per client (fl.num_clients); the run dir gets the same files (metrics.jsonl, summary.json,
partition.json, the matrices).
"""
import hydra
from omegaconf import DictConfig

from celora import cli


@hydra.main(version_base="1.3", config_path="../../conf", config_name="config")
def job(cfg: DictConfig) -> float | None:
    from celora.flower.simulate import simulate
    from celora.metrics import objective

    return objective(simulate(cfg), cfg.get("optimized_metric"))


def main() -> None:
    """A user's mistake in one line (exit code 2), a bug with its traceback: celora.cli."""
    cli.main(job, program="python -m celora.flower")


if __name__ == "__main__":
    main()
