"""Class-balanced sampling: class and instance uniformity, sharding across ranks, determinism."""

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dscl.data import ClassBalancedSampler
from dscl.errors import DataError


@pytest.fixture(scope="module")
def skewed_targets():
    # 2000 / 200 / 20 / 2 images: a random sampler would draw class 0 about 90 % of the time
    labels = np.repeat([0, 1, 2, 3], [2000, 200, 20, 2])
    return np.random.default_rng(0).permutation(labels).tolist()


def test_class_frequencies_are_uniform(skewed_targets):
    n = 40_000
    draws = list(ClassBalancedSampler(skewed_targets, num_samples=n, seed=3))
    assert len(draws) == n
    freq = np.bincount(np.array(skewed_targets)[draws], minlength=4) / n
    # binomial sd is sqrt(.25 * .75 / n) ~ 0.0022; 0.015 is ~7 sd, yet far below the 0.65
    # excess a plain random sampler gives class 0.
    assert np.abs(freq - 0.25).max() < 0.015
    plain = torch.randint(len(skewed_targets), (n,), generator=torch.Generator().manual_seed(3))
    plain_freq = np.bincount(np.array(skewed_targets)[plain.numpy()], minlength=4) / n
    assert np.abs(plain_freq - 0.25).max() > 0.015  # the bound does separate the two


def test_instances_are_uniform_within_a_class(skewed_targets):
    y = np.array(skewed_targets)
    draws = np.array(list(ClassBalancedSampler(skewed_targets, num_samples=40_000, seed=5)))
    members = np.where(y == 1)[0]
    hits = np.array([(draws == i).sum() for i in members])  # ~10,000 draws over 200 items
    expected = hits.sum() / len(members)
    chi2 = ((hits - expected) ** 2 / expected).sum()
    dof = len(members) - 1
    assert chi2 < dof + 6 * math.sqrt(2 * dof)
    assert hits.min() > 0
    two = np.where(y == 3)[0]  # the 2-image class: ~5,000 draws each
    counts = [(draws == i).sum() for i in two]
    assert abs(counts[0] - counts[1]) < 0.1 * sum(counts)


def test_absent_classes_are_never_chosen():
    targets = [0] * 50 + [2] * 5 + [5] * 1
    draws = list(ClassBalancedSampler(targets, num_samples=6000, seed=0))
    freq = np.bincount(np.array(targets)[draws], minlength=6) / 6000
    assert freq[[1, 3, 4]].sum() == 0
    assert np.abs(freq[[0, 2, 5]] - 1 / 3).max() < 0.03


@pytest.mark.parametrize("num_samples, world_size", [(100, 3), (64, 4), (7, 2), (2, 5)])
def test_ranks_split_the_single_process_stream(skewed_targets, num_samples, world_size):
    single = list(ClassBalancedSampler(skewed_targets, num_samples=num_samples, seed=11))
    shards = [ClassBalancedSampler(skewed_targets, num_samples=num_samples, seed=11, rank=r,
                                   world_size=world_size) for r in range(world_size)]
    per_rank = math.ceil(num_samples / world_size)
    total = per_rank * world_size
    padded = (single * math.ceil(total / num_samples))[:total]
    rebuilt = [None] * total
    for r, shard in enumerate(shards):
        got = list(shard)
        assert len(shard) == len(got) == per_rank
        rebuilt[r::world_size] = got  # each position of the stream belongs to one rank
    assert rebuilt == padded


def test_deterministic_per_epoch_and_resumable(skewed_targets):
    a = ClassBalancedSampler(skewed_targets, num_samples=500, seed=7)
    b = ClassBalancedSampler(skewed_targets, num_samples=500, seed=7)
    epoch0 = list(a)
    assert epoch0 == list(a) == list(b)
    a.set_epoch(1)
    epoch1 = list(a)
    assert epoch1 != epoch0
    a.set_epoch(2)
    epoch2 = list(a)
    b.set_epoch(2)  # a resumed run jumps straight to epoch 2
    assert list(b) == epoch2
    c = ClassBalancedSampler(skewed_targets, num_samples=500, seed=8)
    assert list(c) != epoch0


def test_default_length_and_dataloader_use():
    targets = [0, 0, 0, 1, 1, 2]
    sampler = ClassBalancedSampler(targets)
    assert len(sampler) == len(targets)
    loader = DataLoader(list(range(len(targets))), batch_size=4, sampler=sampler)
    batches = [b.tolist() for b in loader]
    assert sum(batches, []) == list(sampler)


def test_bad_arguments():
    with pytest.raises(DataError):
        ClassBalancedSampler([])
    with pytest.raises(DataError):
        ClassBalancedSampler([0, -1])
    with pytest.raises(ValueError):
        ClassBalancedSampler([0, 1], rank=2, world_size=2)
    with pytest.raises(ValueError):
        ClassBalancedSampler([0, 1], num_samples=0)
