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
from PIL import Image
from torch.utils.data import Dataset

from ..config import Config
from ..errors import ConfigError
from .seeding import mix_seed

MAX_SIDE = 64  # larger images stay on the per-image (PIL) path


MAX_BYTES = 4 * 2**30  # auto keeps a file list on the per-image path above this much uint8
PROBES = 8  # images whose size auto checks in a file list


def use_tensor_pipeline(cfg: Config, dataset: Dataset) -> bool:
    return pipeline_choice(cfg, dataset)[0]


def pipeline_choice(cfg: Config, dataset: Dataset) -> tuple[bool, str]:
    """(on-device path?, why), for ``data.pipeline``: ``auto`` takes the on-device path for data
    already in memory and for file lists of small images of one size (checked on a few files,
    spread over the list), where it keeps up and the per-image path does not."""
    if cfg.data.pipeline != "auto":
        return cfg.data.pipeline == "tensor", f"data.pipeline: {cfg.data.pipeline}"
    if hasattr(dataset, "data"):
        return True, "auto: images already in memory"
    paths = getattr(dataset, "paths", None)
    if not paths:
        return False, "auto: not a file list"
    sizes = set()
    for i in range(0, len(paths), max(1, len(paths) // PROBES)):
        try:
            with Image.open(paths[i]) as image:
                sizes.add(image.size)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return False, f"auto: {paths[i]} unreadable"
    if len(sizes) != 1 or max(next(iter(sizes))) > MAX_SIDE:
        return False, f"auto: images larger than {MAX_SIDE} px or of several sizes"
    w, h = sizes.pop()
    if len(paths) * w * h * 3 > MAX_BYTES:
        return False, f"auto: {len(paths)} images would need more than {MAX_BYTES // 2**30} GiB in memory"
    return True, f"auto: {w}x{h}-px images"


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
