#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py): bench lines and the CIFAR-10-LT protocol, into OUT.
# Usage: benchmarks/gpu.sh OUT [cifar10-jpeg folder or .tar.gz] [--smoke] [gpu_check.py options]
set -euo pipefail
out=${1:?usage: benchmarks/gpu.sh OUT [CIFAR] [--smoke] [options]}
shift
args=(--out "$out")
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then args+=(--cifar "$1"); shift; fi
exec "${PYTHON:-python}" "$(dirname "$0")/gpu_check.py" "${args[@]}" "$@"
