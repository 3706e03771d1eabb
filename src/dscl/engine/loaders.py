"""Data loaders whose every random draw is a function of (seed, epoch, position).

Each sample of an epoch is augmented under its own seed, derived from the run seed, the epoch
and its position in the epoch's order. The views of a batch are then the same whether the epoch
runs in one go or is resumed half-way, with any number of loader workers: resuming only needs
the epoch and the number of batches already done.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .distributed import Runtime


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps), stable across runs and platforms."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return x & 0x7FFFFFFFFFFFFFFF


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class SeededDataset(Dataset):
    """Applies ``transform`` under a per-draw seed; the sampler hands ``(index, seed)`` pairs."""

    def __init__(self, dataset: Dataset, transform: Callable):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        image, label = self.dataset[index]
        seed_everything(seed)
        return self.transform(image), label


class EpochOrder(Sampler):
    """This rank's share of an epoch's order, from position ``start``, as ``(index, seed)`` pairs."""

    def __init__(self, order: Sequence[int], epoch_seed: int, start: int = 0):
        self.order, self.epoch_seed, self.start = list(order), epoch_seed, start

    def __len__(self) -> int:
        return len(self.order) - self.start

    def __iter__(self):
        for position in range(self.start, len(self.order)):
            yield int(self.order[position]), mix_seed(self.epoch_seed, position)


def shuffled_order(num_samples: int, seed: int, epoch: int, runtime: Runtime, steps: int, batch: int) -> list[int]:
    """A random permutation for the epoch, cut to whole batches, this rank's interleaved share."""
    g = torch.Generator().manual_seed(mix_seed(seed, epoch, 1))
    perm = torch.randperm(num_samples, generator=g)
    total = steps * batch * runtime.world_size
    if total > num_samples:  # pad by wrapping (only when steps_per_epoch asks for more)
        perm = perm.repeat(total // num_samples + 1)
    return perm[:total][runtime.rank :: runtime.world_size].tolist()


def make_loader(dataset: Dataset, transform: Callable, order: Sequence[int], *, seed: int, epoch: int,
                rank: int, batch: int, start_step: int, num_workers: int, device: torch.device) -> DataLoader:
    sampler = EpochOrder(order, mix_seed(seed, epoch, rank, 2), start=start_step * batch)
    return DataLoader(SeededDataset(dataset, transform), batch_size=batch, sampler=sampler,
                      num_workers=num_workers, pin_memory=device.type == "cuda", drop_last=True,
                      persistent_workers=False)


def steps_per_epoch(num_samples: int, global_batch: int, cap: int | None) -> int:
    steps = num_samples // global_batch
    if steps == 0:
        steps = 1  # a data set smaller than one batch still trains (order wraps around)
    return min(steps, cap) if cap else steps
