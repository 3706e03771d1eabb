#!/usr/bin/env bash
# bf16 autocast and channels_last on a CPU: dscl bench of the 30-epoch CIFAR recipe (ResNet-32,
# batch 128, K = 4,096, 16-px patches) for DSCL and DSCL + PBSD, fp32 / fp32 channels_last /
# bf16 / bf16 channels_last. Each JSON line also times the plain CE step under the same settings.
# Whether bf16 pays depends on the CPU: see docs/PERFORMANCE.md.
set -euo pipefail
dscl=${DSCL:-dscl}
recipe=configs/dscl-pbsd_resnet32_b128-cos-30e_cifar10-lt-r100.yaml
for method in dscl dscl+pbsd; do
  for precision in fp32 bf16; do
    for cl in false true; do
      $dscl bench --config $recipe --set method=$method --set precision=$precision \
                  --set channels_last=$cl --steps 5 --warmup 2
    done
  done
done
