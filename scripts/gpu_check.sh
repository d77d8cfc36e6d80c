#!/usr/bin/env bash
# Everything we want from a lent GPU in one run of at most 8 minutes: build with CUDA, the whole
# test suite, compute-sanitizer (memcheck, racecheck, synccheck, initcheck) over every CUDA and
# Triton kernel, the GPU benchmark, written to bench/results/<gpu>.{md,json} with a log, and the
# H200 model's cases timed next to its predictions (bench/results/model-calibration-<gpu>.{md,json}).
#   bash scripts/gpu_check.sh             # on the GPU machine (no network needed)
#   bash scripts/gpu_check.sh --dry-run   # anywhere: the same steps, skipping what needs a GPU
# The steps and their limits: scripts/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
