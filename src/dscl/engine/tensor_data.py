"""The on-device data path: a small data set held as uint8, augmented in whole batches.

Where a data set fits in memory at a small size (CIFAR, the synthetic set, a 32-px image
folder), its images are kept as one (N, H, W, 3) uint8 tensor on the training device and every
batch's views are built there by :mod:`dscl.data.batched`, with no per-image decoding. Each
batch is drawn under its own generator seeded from (seed, epoch, rank, step), so the views do
not depend on where an epoch was resumed.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import Config
from ..errors import ConfigError
from .seeding import mix_seed

MAX_SIDE = 64  # larger images stay on the per-image (PIL) path


def use_tensor_pipeline(cfg: Config, dataset: Dataset) -> bool:
    if cfg.data.pipeline == "pil":
        return False
    if cfg.data.pipeline == "tensor":
        return True
    return hasattr(dataset, "data")  # auto: data sets that are already arrays in memory


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
