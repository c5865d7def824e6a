#!/usr/bin/env bash
# On a GPU host with the project's wheels staged in /tmp/gpu-stage (docs/performance.md says how):
# install them once, then run one part of the GPU checks. Logs and JSON go to /tmp/results, packed into
# $OUT/results-<part>.tgz at the end (or left in /tmp/results without $OUT).
#   bash bench/gpu/session.sh smoke               GPU tests of the loss kernels and the bench scripts
#   bash bench/gpu/session.sh scaling             tests/test_gpu_scaling.py (two GPUs)
#   bash bench/gpu/session.sh profile             bench/parallel_profile.py, 1 vs 2 DDP vs 2 FSDP2 processes
#   bash bench/gpu/session.sh matrix [args...]    bench/matrix.py with these arguments
set -uo pipefail
part=${1:?usage: session.sh smoke|scaling|profile|matrix [args]}; shift
R=/tmp/results; mkdir -p $R
[ -f /tmp/site/.ready ] || OUT= bash /tmp/gpu-stage/host-install.sh > $R/install.log 2>&1 || { tail -20 $R/install.log; exit 1; }
source /tmp/site/env.sh
export PYTHONUNBUFFERED=1
quiet() { grep -v "it/s\]\|Warning\|warn(" ; }
case $part in
  smoke)
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python3 -c "import torch, transformers, transformer_engine as te, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'te', te.__version__, 'triton', triton.__version__)"
    python3 -m pytest tests/test_ce_kernel.py tests/test_bench_gpu.py -m gpu -q -p no:cacheprovider -o addopts="" 2>&1 | quiet | tee $R/smoke.log | tail -15 ;;
  scaling)
    python3 -m pytest tests/test_gpu_scaling.py -m gpu -s -q -p no:cacheprovider -o addopts="" 2>&1 | quiet | tee $R/scaling.log | grep -A8 "^| run\|passed\|failed\|Error" ;;
  profile)
    python3 bench/parallel_profile.py --shape llama-380m --seq 1024 --global-batch 32 --fp8 delayed \
      --out $R/parallel.json 2>&1 | quiet | tee $R/profile.log | tail -60 ;;
  matrix)
    python3 bench/matrix.py --out $R/matrix "$@" ;;
esac
status=$?
[ -n "${OUT:-}" ] && tar czf "$OUT/results-$part.tgz" -C /tmp results
exit $status
