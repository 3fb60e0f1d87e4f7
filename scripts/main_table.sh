#!/usr/bin/env bash
# The main table (conf/experiment/main_table.yaml): one resumable sweep of 81 runs, then the report.
#   bash scripts/main_table.sh [more overrides]
# Re-run it after any stop: finished runs return at once, an interrupted one resumes from its last round.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -m celora.archive restore docs/results/main_table/runs multirun/main_table  # runs finished on another machine
# The frontier's r = 8 runs are this table's Dirichlet(0.5) seed-1 runs (same config): taken, not run twice.
# A run whose config differs after all is run again (run.finished_before compares the summary's config).
for m in tri celora lora ffa_lora fed_sb; do
  for src in multirun/frontier/tuned/$m/r=8 docs/results/frontier/runs/tuned/$m/r=8; do
    if [ -f "$src/summary.json" ]; then
      "$PY" -m celora.archive restore "$src" "multirun/main_table/dirichlet_0.5/tuned/$m/seed=1"
      break
    fi
  done
done
trap '"$PY" -m celora.archive keep multirun/main_table docs/results/main_table/runs' EXIT  # what finished is kept
"$PY" -m celora -m experiment=main_table "$@"
"$PY" scripts/report.py multirun/main_table --by split method --paired --summaries --out docs/results/main_table
# the same runs read for the global model (paired against the best baseline that has one; the plots show global/acc)
"$PY" scripts/report.py multirun/main_table --by split method --paired --metric global/acc --out docs/results/main_table/global_acc
