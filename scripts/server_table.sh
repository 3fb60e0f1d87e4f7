#!/usr/bin/env bash
# docs/server.md's table: lora, tri and celora with FedAvg against their server optimizers at tuned rates, on the
# embedded default's Dirichlet(0.5) split at seed 1 (one seed; the main table's first test seed). Each method named
# needs its tuned preset (python scripts/tune.py server-choose); FedAvg's runs are the main table's seed-1 runs
# (the same config), restored from docs/results/main_table/runs, not run twice.
#   bash scripts/server_table.sh lora_fedadam lora_fedavgm tri_fedadam tri_fedavgm celora_fedadam celora_fedavgm
# Re-run it after any stop: finished runs return at once.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=multirun/server_table
KEPT=docs/results/server_table/runs
[ $# -gt 0 ] || { echo "name the server-optimizer methods, e.g. lora_fedadam tri_fedavgm" >&2; exit 2; }
"$PY" -m celora.archive restore "$KEPT" "$OUT"
for m in lora tri celora; do
  dst="$OUT/dirichlet_0.5/tuned/$m/seed=1"
  [ -f "$dst/summary.json" ] || "$PY" -m celora.archive restore "docs/results/main_table/runs/dirichlet_0.5/tuned/$m/seed=1" "$dst"
done
methods=$(printf 'tuned/%s,' lora tri celora "$@")
trap '"$PY" -m celora.archive keep "$OUT" "$KEPT"' EXIT  # what finished is kept
"$PY" -m celora -m experiment=main_table +split=dirichlet_0.5 seed=1 "method=${methods%,}" "hydra.sweep.dir=$OUT"
"$PY" scripts/report.py "$OUT" --by method --out docs/results/server_table
