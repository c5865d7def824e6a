#!/usr/bin/env bash
# On a GPU host with the project's wheels staged in /tmp/gpu-stage (see docs/performance.md):
# install them once, run the GPU smoke tests of the bench and the loss kernel, then the bench matrix.
#   bash bench/gpu/session.sh [matrix arguments...]      results and logs under $OUT (or ./results)
set -uo pipefail
OUT=${OUT:-results}
mkdir -p "$OUT"
[ -f /tmp/site/.ready ] || bash /tmp/gpu-stage/host-install.sh > "$OUT/install.log" 2>&1 || { tail -20 "$OUT/install.log"; exit 1; }
source /tmp/site/env.sh
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, transformers, transformer_engine as te, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'te', te.__version__, 'triton', triton.__version__)"
python3 -m pytest tests/test_ce_kernel.py tests/test_bench_gpu.py -m gpu -q -p no:cacheprovider -o addopts="" 2>&1 | tail -5
python3 bench/matrix.py --out "$OUT/matrix" "$@"
