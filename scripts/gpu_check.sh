#!/usr/bin/env bash
# The GPU check in one call, on a machine without network whose python3 has CUDA torch, Lightning and transformers
# but maybe not Hydra, OmegaConf or bitsandbytes: installs the wheelhouse of
# scripts/gpu_wheels.sh into a folder of its own (only the packages python3 cannot import), then measures with
# python3 itself (scripts/gpu_bench.py: random models of real shapes, synthetic batches, no asset). The table lands
# in ${OUT:-gpu_results}/table.md, its rows in rows.jsonl, the log in log.txt.
#   bash scripts/gpu_check.sh            # on the GPU machine (docs/parallel.md, "The GPU check"), <= 150 s a model
#   bash scripts/gpu_check.sh --tiny     # the CPU dry run: tiny configs, one thread, a few steps
# Further arguments go to gpu_bench.py (--models minilm, --checkpointing off, --budget-s 120, ...);
# PYTHON picks another interpreter, WHEELHOUSE another wheelhouse.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_results}
wheels=${WHEELHOUSE:-.cache/wheelhouse}
py=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
site=$tmp/site
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled

[ -d "$wheels" ] || { echo "gpu_check: no wheelhouse at $wheels; run bash scripts/gpu_wheels.sh first" >&2; exit 1; }
need=()
for pair in hydra-core:hydra omegaconf:omegaconf antlr4-python3-runtime:antlr4 bitsandbytes:bitsandbytes; do
    "$py" -c "import ${pair#*:}" 2>/dev/null || need+=("${pair%%:*}")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "installing from $wheels: ${need[*]}"
    if "$py" -m pip --version >/dev/null 2>&1; then
        "$py" -m pip install -q --no-index --no-deps --find-links "$wheels" --target "$site" "${need[@]}"
    else  # no pip: a py3-none wheel unpacked onto the path is installed
        for name in "${need[@]}"; do
            "$py" -m zipfile -e "$(ls "$wheels/${name//-/_}"-*.whl | head -1)" "$site"
        done
    fi
fi
{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; } \
    > "$out/device.txt" 2>&1 || true
PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" "$py" scripts/gpu_bench.py --out "$out" "$@" 2>&1 \
    | tee "$out/log.txt"
