"""scripts/gpu_bench.py, the GPU check's measurement: its tiny CPU run end to end, and the table and targets it
reads off its rows."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_bench as bench  # noqa: E402


def test_tiny_run_writes_its_table(tmp_path):
    """A classifier and a causal LM (bf16 and nf4 weights), checkpointing on: one row per setting, every one run,
    celora's token count; the children never import what the offline GPU machine lacks (they exit non-zero)."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_bench.py"), "--tiny", "--out", str(tmp_path),
                          "--models", "minilm", "llama1b", "--precisions", "32-true", "--checkpointing", "on"],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    settings = ["sequential", "stacked K=1", "stacked K=2", "stacked K=all (4)", "centralized"]
    groups = [("minilm", "fp32", "32-true"), ("llama1b", "bf16", "bf16-mixed"), ("llama1b", "nf4", "bf16-mixed")]
    assert [(r["model"], r["weights"], r["precision"], r["setting"]) for r in rows] == [
        (*g, s) for g in groups for s in settings]
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    for r in rows:
        if r["weights"] == "nf4" and not has_bnb:
            assert r["status"].startswith("bitsandbytes not importable")
            continue
        assert r["status"] == "ok" and r["checkpointing"] and r["device"] == "cpu"
        # each row's input tokens: N clients x steps x batch rows of 8..16 tokens (centralized: the same rows)
        assert 4 * 2 * 2 * 8 <= r["tokens"] <= 4 * 2 * 2 * 16 and r["seconds"] > 0 and r["peak_mib"] > 0
    table = (tmp_path / "table.md").read_text()
    assert table.startswith("Device: CPU;") and "tiny shapes" in table
    assert table.count("| minilm | fp32 | 32-true | on |") == 5 and "Targets (tiny shapes" in table


def row(setting: str, tokens: int, model: str = "minilm", status: str = "ok", clients: int = 64) -> bench.Row:
    return bench.Row(model=model, weights="fp32", precision="bf16-mixed", checkpointing=False, setting=setting,
                     device="gpu", tokens=tokens, seconds=1.0, peak_mib=100.0, status=status,
                     shape={"clients": clients})


def test_table_ratios_and_targets():
    """Ratios are to the group's sequential and centralized rows; the MiniLM target needs both 10x sequential and
    0.9x centralized at the best K; the 1B target counts the largest stacked cohort that ran."""
    rows = [row("sequential", 100), row("stacked K=8", 900), row("stacked K=all (64)", 1200),
            row("centralized", 1300)]
    lines = bench.table(rows).splitlines()
    assert lines[3].endswith("| stacked K=8 | 900 | 100 | 9.00 | 0.69 |")
    assert lines[4].endswith("| 1,200 | 100 | 12.00 | 0.92 |")
    assert bench.targets(rows) == ["- minilm fp32 bf16-mixed checkpointing off: best stacked K=all (64), 12.0x "
                                   "sequential (target >= 10), 0.92x centralized (target >= 0.9): met"]
    slower = [*rows[:3], row("centralized", 1400)]
    assert bench.targets(slower)[0].endswith("0.86x centralized (target >= 0.9): not met")

    llm = [row("sequential", 10, "llama1b", clients=16), row("stacked K=8", 50, "llama1b", clients=16),
           row("stacked K=all (16)", 0, "llama1b", "OOM", clients=16), row("centralized", 60, "llama1b", clients=16)]
    assert bench.targets(llm)[0].startswith("- llama1b fp32 bf16-mixed checkpointing off: 8 clients stacked "
                                            "(stacked K=8, peak 100 MiB; target >= 8): met")
    assert "| stacked K=all (16) | OOM | 100 | - | - |" in bench.table(llm)


@pytest.mark.parametrize("name", list(bench.SHAPES))
def test_shapes_are_the_real_models(name):
    """The configs are those of the checkpoints named (what the GPU table claims to measure), and a tiny shape
    keeps the family and the settings but not the sizes."""
    real = {"minilm": (6, 384, 30522), "smollm2": (30, 576, 49152), "llama1b": (16, 2048, 128256)}[name]
    shape = bench.SHAPES[name]
    c = shape.config
    assert (c["num_hidden_layers"], c["hidden_size"], c["vocab_size"]) == real
    small = bench.tiny(shape)
    assert small.family == shape.family and small.weights == shape.weights and small.config["hidden_size"] == 64
