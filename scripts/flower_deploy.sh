#!/usr/bin/env bash
# Flower's Deployment Runtime on this machine, end to end: one SuperLink, one SuperNode per client on
# 127.0.0.1, then `flwr run` of this repo's Flower App; everything started is stopped on exit.
#   bash scripts/flower_deploy.sh OUT_DIR [hydra overrides...]
# e.g. bash scripts/flower_deploy.sh /tmp/deploy +debug=tiny method=celora
# Exits 0 only when the run finished as completed and OUT_DIR/summary.json exists. docs/flower.md.
set -u
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:?usage: flower_deploy.sh OUT_DIR [overrides...]}"); shift
OVERRIDES="$*"
SL_PORT=${SL_PORT:-8000}
SN_PORT0=${SN_PORT0:-9094}
RUN_TIMEOUT=${RUN_TIMEOUT:-900}
PY=.venv/bin/python
BIN=.venv/bin
N=$($PY - "$OVERRIDES" <<'PYEOF'
import sys
from celora.flower.settings import compose
print(compose(sys.argv[1]).fl.num_clients)
PYEOF
) || { echo "flower_deploy: the overrides do not compose: $OVERRIDES" >&2; exit 2; }
mkdir -p "$OUT/logs"
export FLWR_HOME=${FLWR_HOME:-$OUT/flwr_home}  # the connection below, Flower's apps and its state: not ~/.flwr
export FLWR_DISABLE_UPDATE_CHECK=1 FLWR_TELEMETRY_ENABLED=0
export PATH="$PWD/.venv/bin:$PATH"  # the SuperLink and SuperNodes start flower-superexec and the apps from it
mkdir -p "$FLWR_HOME"
printf '[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\naddress = "127.0.0.1:%s"\ninsecure = true\n' \
  "$SL_PORT" > "$FLWR_HOME/config.toml"
for p in "$SL_PORT" $(seq "$SN_PORT0" $((SN_PORT0 + N - 1))); do
  if (echo > "/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "flower_deploy: port $p is in use" >&2; exit 2; fi
done

PIDS=()
cleanup() {
  local all=() p k
  for p in "${PIDS[@]}"; do all+=("$p"); for k in $(pgrep -P "$p"); do all+=("$k" $(pgrep -P "$k")); done; done
  [ ${#all[@]} -gt 0 ] || return 0
  kill -TERM "${PIDS[@]}" 2>/dev/null
  for _ in $(seq 1 20); do
    alive=0; for p in "${all[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break; sleep 0.5
  done
  for p in "${all[@]}"; do kill -KILL "$p" 2>/dev/null; done
  return 0
}
trap cleanup EXIT INT TERM

T0=$(date +%s)
# the run's environment is this venv: no per-run dependency install from PyPI
$BIN/flower-superlink --insecure --disable-runtime-dependency-installation --host 127.0.0.1 --port "$SL_PORT" \
  > "$OUT/logs/superlink.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 120); do
  $PY -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$SL_PORT/health', timeout=1)" 2>/dev/null && break
  sleep 0.5
done
for i in $(seq 0 $((N - 1))); do
  $BIN/flower-supernode --insecure --superlink "127.0.0.1:$SL_PORT" --port $((SN_PORT0 + i)) \
    --node-config "partition-id=$i num-partitions=$N" > "$OUT/logs/supernode$i.log" 2>&1 &
  PIDS+=($!)
done
timeout "$RUN_TIMEOUT" $BIN/flwr run . deploy --stream \
  --run-config "overrides='$OVERRIDES' out-dir='$OUT'" > "$OUT/logs/flwr_run.log" 2>&1
RUN_ID=$(grep -o 'Successfully started run [0-9]*' "$OUT/logs/flwr_run.log" | awk '{print $4}')
STATUS=$($BIN/flwr ls deploy --run-id "${RUN_ID:-0}" --format json 2>/dev/null | \
  $PY -c "import sys, json; print(json.load(sys.stdin)['runs'][0]['status'])" 2>/dev/null)
echo "flower_deploy: run ${RUN_ID:-?} ${STATUS:-unknown} in $(( $(date +%s) - T0 )) s ($N SuperNodes) -> $OUT"
case "$STATUS" in finished:completed*) [ -f "$OUT/summary.json" ] && exit 0;; esac
echo "flower_deploy: see $OUT/logs" >&2
exit 1
