#!/usr/bin/env bash
# Builds the GPU check's wheelhouse: what scripts/gpu_bench.py imports beyond the offline GPU machine's own packages
# (CPython 3.12, manylinux x86_64, with CUDA torch, Lightning, transformers, peft, pandas, pyarrow, scikit-learn).
# celora.schema imports Hydra and OmegaConf (pure Python; antlr4-python3-runtime 4.9.3, which they pin, exists only
# as an sdist, so it is built here into a py3-none-any wheel); the nf4 rows need bitsandbytes (py3-none-manylinux:
# one wheel for every CPython 3, its CUDA kernels inside). Every wheel is py3-none-*, so the same folder serves
# the dry run on this machine's Python 3.11. Fails over 60 MiB. Needs PyPI; run it where the repo is prepared.
#   bash scripts/gpu_wheels.sh              # -> .cache/wheelhouse/ (ignored by git), 41.5 MiB
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${WHEELHOUSE:-.cache/wheelhouse}
py=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
limit_mib=60
WHEELS=(hydra-core==1.3.8 omegaconf==2.3.1 bitsandbytes==0.50.2)
SDISTS=(antlr4-python3-runtime==4.9.3)
# the target's tags: pip does not widen a newer manylinux tag to the older ones, so each is named
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_24_x86_64 manylinux2014_x86_64 any)

rm -rf "$dest"
mkdir -p "$dest"
"$py" -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version 3.12 \
    "${PLATFORMS[@]/#/--platform=}" -d "$dest" "${WHEELS[@]}"
"$py" -m pip wheel -q --no-deps -w "$dest" "${SDISTS[@]}"

for whl in "$dest"/*.whl; do
    case "$(basename "$whl")" in
        *-py3-none-*|*-py2.py3-none-*) ;;
        *) echo "gpu_wheels: $(basename "$whl") is tied to one Python ABI; the wheelhouse takes py3-none wheels" >&2
           exit 1 ;;
    esac
done
ls -l "$dest"/*.whl | awk '{printf "%8.1f MiB  %s\n", $5 / 1048576, $NF}'
bytes=$(cat "$dest"/*.whl | wc -c)
awk -v b="$bytes" -v d="$dest" 'BEGIN {printf "%s: %.1f MiB in all\n", d, b / 1048576}'
if [ "$bytes" -gt $((limit_mib * 1048576)) ]; then
    echo "gpu_wheels: the wheelhouse is over ${limit_mib} MiB; drop a package or ship it apart" >&2
    exit 1
fi
