#!/usr/bin/env bash
# The figures of docs/PERFORMANCE.md for a CPU: dscl bench for the CIFAR-size ResNet-32 recipe
# (batch 128, 16-px patches) at K = 4,096 and 65,536, reference vs optimised, DSCL alone and with
# PBSD, and peak memory at B = 256, K = 65,536. One JSON line per figure.
set -euo pipefail
dscl=${DSCL:-dscl}
cifar=(--set pretrain.batch_size=128 --set pretrain.patch_size=16 --set data.image_size=32)
for method in dscl+pbsd dscl; do
  for k in 4096 65536; do
    $dscl bench "${cifar[@]}" --set method=$method --set pretrain.queue_size=$k --steps 7
  done
done
$dscl bench "${cifar[@]}" --set pretrain.queue_size=65536 --reference --steps 3
$dscl bench "${cifar[@]}" --set pretrain.queue_size=4096 --reference --steps 3
$dscl bench --set pretrain.batch_size=256 --set pretrain.patch_size=16 --set data.image_size=32 \
            --set pretrain.queue_size=65536 --steps 3
