#!/usr/bin/env bash
# The prepared GPU check: bench figures and a short GPU-resident CIFAR-10-LT run, into $1.
# Usage: benchmarks/gpu.sh OUT [cifar10-jpeg folder or .tar.gz] [--smoke]
set -euo pipefail
out=${1:?usage: benchmarks/gpu.sh OUT [CIFAR] [--smoke]}
shift
args=(--out "$out")
if [ $# -gt 0 ] && [ "$1" != "--smoke" ]; then args+=(--cifar "$1"); shift; fi
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1 || echo "no nvidia-smi" > "$out/gpu.txt"
exec "${PYTHON:-python}" "$(dirname "$0")/gpu_check.py" "${args[@]}" "$@"
