"""What a run tells its user while it works: the log file (warnings included), progress bars, the partition's summary."""
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

from celora.data.partition import partition_summary
from celora.progress import logs_beside_bars, sweep_size

ROOT = Path(__file__).resolve().parents[1]


def _celora(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "celora", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_warnings_bars_and_the_partition_reach_the_run_log(tmp_path):
    """A tiny run, then the same dir resumed under a changed config (resume=force): the forced resume's warning is
    in the run's log file (Hydra's <job>.log), beside the partition's one-line summary and each round's line; the
    progress bars (rounds, evaluation, data statistics) are drawn on stderr, not written into the log."""
    common = ["+debug=tiny", "method=celora", "simulation.progress=true", f"hydra.run.dir={tmp_path}"]
    first = _celora(*common)
    assert first.returncode == 0, first.stderr[-2000:]
    second = _celora(*common, "fl.rounds=3", "resume=force")
    assert second.returncode == 0, second.stderr[-2000:]
    text = (tmp_path / "__main__.log").read_text()
    assert "resuming after round 2 under a changed config (resume=force): fl.rounds: 2 -> 3" in text
    assert "partition: 3 clients; train rows (min / median / max)" in text
    assert "round 3: global/acc" in text
    for name in ("rounds", "evaluation", "data statistics"):
        drawn = re.compile(name + r":\s+\d+%\|")  # a bar: its name, a percentage and the bar's edge
        assert drawn.search(first.stderr), name
        assert not drawn.search(text), name


def test_python_warnings_become_log_records_while_a_run_works(caplog):
    with caplog.at_level(logging.WARNING, logger="py.warnings"), logs_beside_bars():
        warnings.warn("a library's complaint")
    assert any(r.name == "py.warnings" and "a library's complaint" in r.getMessage() for r in caplog.records)
    with warnings.catch_warnings(record=True) as caught:  # outside a run, warnings are Python's again
        warnings.simplefilter("always")
        warnings.warn("after the run")
    assert [str(w.message) for w in caught] == ["after the run"]


def test_the_partition_is_summarised_in_one_line():
    counts = [{"train_size": n, "test_size": t, "train_counts": c}
              for n, t, c in ((10, 3, [10, 0, 0]), (30, 8, [10, 10, 10]), (20, 5, [0, 5, 15]))]
    line = partition_summary(counts)
    assert line.startswith("partition: 3 clients; train rows (min / median / max) 10 / 20 / 30, test rows 3 / 5 / 8, "
                           "classes per client 1 / 2 / 3 of 3")
    assert "\n" not in line and partition_summary([]) == "partition: no clients"


def test_a_sweep_counts_its_jobs_as_hydra_expands_them():
    assert sweep_size(["method=lora,tri,celora", "seed=0,1", "fl.rounds=3"]) == 6
    assert sweep_size(["seed=range(0,4)"], {"method": "lora,tri"}) == 8
    assert sweep_size(["method=lora"], {"method": "lora,tri"}) == 1  # the command line's value wins over params
    assert sweep_size(["client.lr=interval(0.001,0.1)"]) is None  # a search space, not a list of jobs
    assert sweep_size([]) == 1
