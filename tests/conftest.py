"""Shared fixtures: tiny run settings that finish in seconds on a CPU."""

import pytest

# A few steps of everything on a small synthetic set: for end-to-end and resume tests.
TINY = [
    "data.synthetic_n_max=60", "data.synthetic_eval_per_class=10", "data.synthetic_classes=5", "data.imbalance_ratio=10",
    "pretrain.epochs=2", "pretrain.batch_size=8", "pretrain.queue_size=24", "pretrain.steps_per_epoch=3",
    "pretrain.warmup_epochs=1", "pretrain.num_patches=2", "pretrain.key_bn_groups=2",
    "linear.epochs=2", "linear.batch_size=16", "linear.steps_per_epoch=2", "linear.lr=0.05",
    "linear.milestones=[1]", "eval_batch_size=64",
]


@pytest.fixture
def tiny_overrides():
    return list(TINY)
