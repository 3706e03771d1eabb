"""Shared fixtures: tiny run settings that finish in seconds on a CPU."""

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # under `pytest -n N` each worker (and each process it starts) takes one thread, not one per core
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# A few steps of everything on a small synthetic set: for end-to-end and resume tests.
TINY = [
    "data.synthetic_n_max=60", "data.synthetic_eval_per_class=10", "data.synthetic_classes=5",
    "data.imbalance_ratio=10",
    "pretrain.epochs=2", "pretrain.batch_size=8", "pretrain.queue_size=24", "pretrain.steps_per_epoch=3",
    "pretrain.warmup_epochs=1", "pretrain.num_patches=2", "pretrain.key_bn_groups=2",
    "linear.epochs=2", "linear.batch_size=16", "linear.steps_per_epoch=2", "linear.lr=0.05",
    "linear.milestones=[1]", "eval_batch_size=64",
]


@pytest.fixture
def tiny_overrides():
    return list(TINY)


def _check_patch_boxes(boxes: torch.Tensor, size: int, scale: tuple[float, float]) -> None:
    """PBSD patch boxes (N, 4) as x1, y1, x2, y2 pixels of a size x size view: whole pixels, inside
    the view, area fraction in ``scale`` and uniform over it, aspect ratio in [3/4, 4/3], and
    (over many draws) touching every edge of the view."""
    boxes = boxes.double()
    x1, y1, x2, y2 = boxes.unbind(1)
    assert torch.equal(boxes, boxes.round())
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= size).all() and (y2 <= size).all()
    w, h = x2 - x1, y2 - y1
    area = w * h / size**2
    assert (area >= scale[0]).all() and (area <= scale[1]).all()
    assert (w / h >= 3 / 4).all() and (w / h <= 4 / 3).all()
    assert abs(area.mean().item() - sum(scale) / 2) < 0.02  # uniform in the range
    assert x1.min() == 0 and y1.min() == 0 and x2.max() == size and y2.max() == size


@pytest.fixture
def check_patch_boxes():
    """The property check shared by the per-image and the batched patch samplers."""
    return _check_patch_boxes

