#!/usr/bin/env bash
# Regenerate the lock files from pyproject.toml's ranges. Run it on purpose (after changing a dependency,
# or to take newer releases), then run the tests and commit the lock files with the change.
#
#   pip install uv==0.13.9 && bash requirements/lock.sh
#
# cpu.txt: CPU machines, Python 3.11 (the quick start and CI), with the dev extra. torch is left out: it
#   is installed first, as the CPU build (torch==2.13.0), and the lock pins what that build needs.
# gpu.txt: GPU nodes, Python 3.12, with the te extra. torch, triton and the CUDA libraries are left to
#   the node's CUDA image; gpu-constraints.txt holds the versions that ran on the GPU host.
# The CPU torch wheel comes from TORCH_CPU_WHEELS (a folder holding it) or the PyTorch CPU index.
set -euo pipefail
cd "$(dirname "$0")/.."
torch_source=(--index https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
wheels=${TORCH_CPU_WHEELS:-/opt/wheels}
[ -d "$wheels" ] && torch_source=(--find-links "$wheels")
common=(--python-platform x86_64-manylinux_2_28 --annotation-style line --quiet --custom-compile-command "bash requirements/lock.sh")

uv pip compile pyproject.toml --extra dev --python-version 3.11 "${common[@]}" "${torch_source[@]}" \
    -c requirements/cpu-constraints.txt --no-emit-package torch -o requirements/cpu.txt
uv pip compile pyproject.toml --extra te --python-version 3.12 "${common[@]}" \
    -c requirements/gpu-constraints.txt -o requirements/gpu.txt.tmp
# What the CUDA image brings: torch, its triton and its CUDA libraries.
grep -vE '^(torch|triton|nvidia-[a-z0-9-]+|cuda-[a-z-]+)==' requirements/gpu.txt.tmp > requirements/gpu.txt
rm requirements/gpu.txt.tmp
echo "wrote requirements/cpu.txt ($(grep -c '==' requirements/cpu.txt) pins), requirements/gpu.txt ($(grep -c '==' requirements/gpu.txt) pins)"
