"""Class-balanced sampling for stage 2 (the paper's, after Kang et al. 2020): draw a class uniformly, then an image.

Each draw first picks one of the classes that have at least one sample, uniformly, then one
index of that class, uniformly; draws are independent (with replacement). One epoch's stream
of draws comes from a ``torch.Generator`` seeded with ``seed + epoch`` and is the same on every
process, so under ``torchrun`` each rank takes its own interleaved share of it and resuming a
run needs nothing but the epoch number.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from dscl.errors import DataError


class ClassBalancedSampler(Sampler[int]):
    """Class-uniform, then instance-uniform sampling with replacement, sharded across ranks.

    ``num_samples`` is the number of draws per epoch over all ranks (default ``len(targets)``).
    The common stream of ``num_samples`` draws is padded by repeating its beginning up to a
    multiple of ``world_size`` (as ``DistributedSampler`` does); rank ``r`` then yields the
    positions ``r, r + world_size, ...`` of it, ``ceil(num_samples / world_size)`` indices.
    """

    def __init__(
        self,
        targets: Sequence[int],
        num_samples: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        labels = torch.as_tensor(list(targets), dtype=torch.long)  # (N,)
        if labels.numel() == 0:
            raise DataError("ClassBalancedSampler: targets is empty, nothing to sample")
        if int(labels.min()) < 0:
            raise DataError(f"ClassBalancedSampler: negative label {int(labels.min())} in targets")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        if num_samples is None:
            num_samples = labels.numel()
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epoch = 0

        sizes = torch.bincount(labels)  # (C,) images per class
        self._classes = torch.nonzero(sizes).flatten()  # (C',) classes with samples
        self._sizes = sizes  # (C,)
        self._starts = torch.cumsum(sizes, 0) - sizes  # (C,) first slot of each class
        self._by_class = torch.argsort(labels, stable=True)  # (N,) indices grouped by class

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose stream the next iteration yields."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.world_size)

    def stream(self, epoch: int | None = None) -> torch.Tensor:
        """The common stream of ``num_samples`` draws of an epoch (the current one by default)."""
        g = torch.Generator()
        g.manual_seed(self.seed + (self.epoch if epoch is None else int(epoch)))
        n = self.num_samples
        pick = torch.randint(len(self._classes), (n,), generator=g)  # (n,)
        cls = self._classes[pick]  # (n,) class of each draw
        u = torch.rand(n, generator=g, dtype=torch.float64)  # (n,)
        size = self._sizes[cls]
        pos = torch.minimum((u * size).long(), size - 1)  # (n,) uniform in [0, size)
        return self._by_class[self._starts[cls] + pos]

    def __iter__(self) -> Iterator[int]:
        draws = self.stream()
        total = len(self) * self.world_size
        if total > draws.numel():  # pad by repeating the stream's beginning
            reps = math.ceil(total / draws.numel())
            draws = draws.repeat(reps)[:total]
        return iter(draws[self.rank : total : self.world_size].tolist())


class NaturalSampler(ClassBalancedSampler):
    """Instance-uniform sampling: each epoch's stream is a fresh permutation of all indices
    (repeated when ``num_samples`` exceeds them), so classes come at their training frequency.
    Sharded across ranks as :class:`ClassBalancedSampler`. Stage 2 uses it with a
    logit-adjusted loss instead of class-balanced draws."""

    def stream(self, epoch: int | None = None) -> torch.Tensor:
        g = torch.Generator()
        g.manual_seed(self.seed + (self.epoch if epoch is None else int(epoch)))
        n, size = self.num_samples, self._by_class.numel()
        return torch.cat([torch.randperm(size, generator=g) for _ in range(math.ceil(n / size))])[:n]
