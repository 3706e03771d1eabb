"""Count the operators one stage-1 training step dispatches, CE beside a contrastive method.

A GPU step made of many small operators is paced by the host that launches them, not by the GPU:
each operator is at least one kernel launch, issued from Python. This counts, per step, the
operators of the device-side view pipeline (``data.pipeline: tensor``) and of the step itself
(forward, backward, SGD as on a GPU, i.e. foreach, EMA update, enqueue), below autograd, where
each one is a kernel or a few; ``*_kernel_ops`` leave out views and bare allocations. The step
includes its views. It runs on the CPU; the count is what any device is asked to run.

    python benchmarks/op_count.py [--set KEY=VALUE ...]   # default: the 30-epoch CIFAR recipe
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dscl.config import load_config
from dscl.engine.pretrain import build_stage1_model, optimise, prepare_model, stage1_losses
from dscl.engine.views import patch_size, stage1_transform

RECIPE = Path(__file__).resolve().parents[1] / "configs/dscl-pbsd_resnet32_b128-cos-30e_cifar10-lt-r100.yaml"


# Operators that run no kernel on any device: views of the same memory and bare allocations.
NO_KERNEL = {"aten.detach", "aten.view", "aten._unsafe_view", "aten.expand", "aten.t", "aten.transpose",
             "aten.permute", "aten.slice", "aten.select", "aten.unsqueeze", "aten.squeeze", "aten.as_strided",
             "aten.alias", "aten.unbind", "aten.split", "aten.split_with_sizes", "aten.chunk", "aten.empty",
             "aten.empty_like", "aten.new_empty", "aten.new_empty_strided", "aten.empty_strided"}


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    def kernels(self) -> int:
        """Operators that run a kernel (not views, not bare allocations)."""
        return sum(n for op, n in self.ops.items() if op not in NO_KERNEL)


def count(overrides: list[str], method: str, num_classes: int = 10, batch: int = 8) -> dict:
    cfg = load_config(RECIPE, [*overrides, f"method={method}", f"pretrain.batch_size={batch}"])
    size = cfg.data.image_size or 32
    torch.manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    labels = torch.randint(0, num_classes, (batch,))
    transform = stage1_transform(cfg, size, on_device=True)
    model = prepare_model(build_stage1_model(cfg, num_classes).train(), cfg)
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4, foreach=True)

    def step():
        views = transform(images)
        loss, parts, keys = stage1_losses(model, (views, labels), cfg, torch.device("cpu"), num_classes=num_classes)
        optimise(model, optimizer, loss, keys, labels)

    step()  # the first step creates the optimizer's state
    with OpCounter() as views_only:
        transform(images)
    with OpCounter() as whole:
        step()
    return {"method": method, "patch_size": patch_size(cfg, size), "views_ops": sum(views_only.ops.values()),
            "views_kernel_ops": views_only.kernels(), "step_ops": sum(whole.ops.values()),
            "step_kernel_ops": whole.kernels(),
            "top": [(op, n) for op, n in whole.ops.most_common() if op not in NO_KERNEL][:8]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--methods", default="ce,scl,dscl,dscl+pbsd")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for method in args.methods.split(","):
        print(json.dumps(count(args.set, method)), flush=True)


if __name__ == "__main__":
    main()
