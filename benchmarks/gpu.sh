#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py): bench lines and a recipe's runs (the CIFAR-10-LT protocol by default), into OUT.
# Usage: benchmarks/gpu.sh OUT [image folder or its .tar.gz: cifar10-jpeg for the default recipe] [--smoke] [gpu_check.py options]
set -euo pipefail
out=${1:?usage: benchmarks/gpu.sh OUT [DATA] [--smoke] [options]}
shift
args=(--out "$out")
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then args+=(--data "$1"); shift; fi
exec "${PYTHON:-python}" "$(dirname "$0")/gpu_check.py" "${args[@]}" "$@"
