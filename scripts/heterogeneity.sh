#!/usr/bin/env bash
# The heterogeneity comparison (conf/experiment/heterogeneity.yaml, docs/heterogeneity.md): seed 1 of every method on
# both splits first, then seeds 2 and 3; the group oracle on the concept-shift split. Re-run it after any stop:
# finished runs return at once, and what finished is kept in docs/results/heterogeneity/runs (celora.archive).
#   bash scripts/heterogeneity.sh [more overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=multirun/heterogeneity
KEPT=docs/results/heterogeneity/runs
"$PY" -m celora.archive restore "$KEPT" "$OUT"
trap '"$PY" -m celora.archive keep "$OUT" "$KEPT"' EXIT
for seed in 1 2 3; do
  "$PY" -m celora -m experiment=heterogeneity "seed=$seed" "$@"
  "$PY" -m celora -m experiment=heterogeneity +split=concept_shift method=tuned/group_oracle "seed=$seed" "$@"
  "$PY" -m celora.archive keep "$OUT" "$KEPT"
done
"$PY" scripts/report.py "$OUT" --by split method --paired --summaries --out docs/results/heterogeneity
