"""Loading a split for training: every random draw a function of (seed, epoch, position).

Per image: each sample of an epoch is augmented under its own seed, derived from the run seed,
the epoch and its position in the epoch's order, so the views of a batch are the same whether
the epoch runs in one go or is resumed half-way, with any number of loader workers.

On the device: where a data set fits in memory at a small size (CIFAR, the synthetic set, a
32-px image folder), its images are kept as one (N, H, W, 3) uint8 tensor on the training device
and every batch's views are built there by :mod:`dscl.data.batched`, each batch under its own
generator seeded from (seed, epoch, rank, step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dscl.errors import ConfigError, DataError
from dscl.seeding import mix_seed, seed_everything

MAX_SIDE = 64  # larger images stay on the per-image (PIL) path


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


def make_loader(dataset: Dataset, transform: Callable, order: Sequence[int], *, seed: int, epoch: int,
                rank: int, batch: int, start_step: int, num_workers: int, device: torch.device) -> DataLoader:
    sampler = EpochOrder(order, mix_seed(seed, epoch, rank, 2), start=start_step * batch)
    return DataLoader(SeededDataset(dataset, transform), batch_size=batch, sampler=sampler,
                      num_workers=num_workers, pin_memory=device.type == "cuda", drop_last=True,
                      persistent_workers=False)


def stop_on_dead_worker(loader: DataLoader, epoch: int):
    """The loader's batches; a worker process that dies (killed, out of memory) stops the run
    with a message naming the cause instead of a traceback from inside the DataLoader."""
    try:
        yield from loader
    except RuntimeError as exc:
        if "DataLoader worker" not in str(exc):
            raise
        raise DataError(f"epoch {epoch + 1}: a data-loader worker process died ({exc}); the usual cause is "
                        f"running out of memory (fewer data.num_workers help). Continue with --resume") from None


def images_in_memory(dataset: Dataset, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H, W, 3) uint8 images and (N,) labels on ``device``; decodes file lists once."""
    cached = getattr(dataset, "_dscl_tensor_cache", None)
    if cached is not None and cached[0].device == device:
        return cached
    data = getattr(dataset, "data", None)
    if data is None:
        images = [np.asarray(dataset[i][0]) for i in range(len(dataset))]
        shapes = {im.shape for im in images}
        if len(shapes) != 1 or max(next(iter(shapes))[:2]) > MAX_SIDE:
            raise ConfigError(f"data.pipeline: 'tensor' needs images of one size, at most {MAX_SIDE} px "
                              f"(found {sorted(shapes)[:3]}); use data.pipeline: pil")
        data = np.stack(images)
    result = (torch.from_numpy(np.ascontiguousarray(data)).to(device),
              torch.as_tensor(dataset.targets, dtype=torch.long, device=device))
    try:
        dataset._dscl_tensor_cache = result
    except AttributeError:
        pass
    return result


class TensorBatches:
    """Batches of ``order`` from position ``start_step * batch``, augmented on the device."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, order, *, batch: int, start_step: int,
                 transform, seed: int, epoch: int, rank: int):
        self.images, self.targets, self.transform = images, targets, transform
        self.order = torch.as_tensor(list(order), dtype=torch.long, device=images.device)
        self.batch, self.start_step = batch, start_step
        self.seed, self.epoch, self.rank = seed, epoch, rank

    def __len__(self) -> int:
        return len(self.order) // self.batch - self.start_step

    def __iter__(self):
        device = self.images.device
        for step in range(self.start_step, len(self.order) // self.batch):
            index = self.order[step * self.batch : (step + 1) * self.batch]
            generator = torch.Generator(device).manual_seed(mix_seed(self.seed, self.epoch, self.rank, step, 6))
            with torch.no_grad():
                views = self.transform(self.images[index], generator=generator)
            yield views, self.targets[index]


def eval_batches(dataset: Dataset, transform, batch: int, device: torch.device):
    """Deterministic batches of a whole split, in order, for evaluation."""
    images, targets = images_in_memory(dataset, device)
    for start in range(0, len(targets), batch):
        with torch.no_grad():
            yield transform(images[start : start + batch]), targets[start : start + batch]
