#!/usr/bin/env bash
# The one short device run of docs/parallel.md, for a machine with a CUDA GPU and celora installed
# (`make setup` with CELORA_TORCH=<your CUDA build>): the device-residency tests on the GPU, then the
# throughput table for minilm and smollm2 in fp32 and bf16-mixed (sequential, K = 1, 8, 32, all,
# centralized; 32 clients), then the scaling table on the GPU. Results land in ${OUT:-gpu_results}/.
#   bash scripts/gpu_check.sh            # about 8 minutes on one H200
set -euo pipefail
out=${OUT:-gpu_results}
mkdir -p "$out"
py=${PYTHON:-.venv/bin/python}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/device.txt"
"$py" -m pytest -q -p no:cacheprovider tests/test_engine.py 2>&1 | tee "$out/tests.txt"
"$py" -m scripts.bench_simulation --accelerator gpu --precisions 32-true bf16-mixed --models minilm \
    --clients 32 --cohorts 1 8 32 all --steps 10 --rounds 2 2>&1 | tee "$out/minilm.md"
"$py" -m scripts.bench_simulation --accelerator gpu --precisions 32-true bf16-mixed --models smollm2 \
    --clients 32 --cohorts 1 8 32 all --batch 4 --steps 4 --rounds 1 2>&1 | tee "$out/smollm2.md"
"$py" -m scripts.bench_simulation --accelerator gpu --models tiny_bert --clients 10,100,1000 --per-round 10 \
    --rounds 3 --steps 4 2>&1 | tee "$out/scale.md"
