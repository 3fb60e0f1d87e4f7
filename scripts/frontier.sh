#!/usr/bin/env bash
# The accuracy-bytes frontier (conf/experiment/frontier.yaml): three resumable sweeps, then the report.
#   bash scripts/frontier.sh [more overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -m celora.archive restore docs/results/frontier/runs multirun/frontier  # runs finished on another machine
trap '"$PY" -m celora.archive keep multirun/frontier docs/results/frontier/runs' EXIT  # what finished is kept
"$PY" -m celora -m experiment=frontier "$@"
"$PY" -m celora -m experiment=frontier method=tuned/lora,tuned/ffa_lora adapter.r=2,4,8,16 "$@"
"$PY" -m celora -m experiment=frontier method=tuned/fed_sb adapter.r=8,32 "$@"
"$PY" scripts/report.py multirun/frontier --by method adapter.r --frontier --summaries --out docs/results/frontier
