"""The batches of each training epoch: which data path (on the device or per image), the
epoch's order and how many steps it has; the loading itself is :mod:`dscl.data.loading`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from ..config import Config
from ..data.loading import MAX_SIDE, TensorBatches, images_in_memory, make_loader, stop_on_dead_worker
from ..seeding import mix_seed
from .distributed import Runtime

MAX_BYTES = 4 * 2**30  # auto keeps a file list on the per-image path above this much uint8
PROBES = 8  # images whose size auto checks in a file list


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


def shuffled_order(num_samples: int, seed: int, epoch: int, runtime: Runtime, steps: int, batch: int) -> list[int]:
    """A random permutation for the epoch, cut to whole batches, this rank's interleaved share."""
    g = torch.Generator().manual_seed(mix_seed(seed, epoch, 1))
    perm = torch.randperm(num_samples, generator=g)
    total = steps * batch * runtime.world_size
    if total > num_samples:  # pad by wrapping (only when steps_per_epoch asks for more)
        perm = perm.repeat(total // num_samples + 1)
    return perm[:total][runtime.rank :: runtime.world_size].tolist()


def steps_per_epoch(num_samples: int, global_batch: int, cap: int | None) -> int:
    steps = num_samples // global_batch
    if steps == 0:
        steps = 1  # a data set smaller than one batch still trains (order wraps around)
    return min(steps, cap) if cap else steps


class EpochBatches:
    """A training split's batches, epoch by epoch: on the device (whole-batch views of an
    in-memory uint8 copy) where ``data.pipeline`` allows, otherwise per image in a DataLoader."""

    def __init__(self, cfg: Config, dataset: Dataset, transform_for, rt: Runtime, *, batch: int, seed: int):
        self.on_device, self.why = pipeline_choice(cfg, dataset)
        self.transform = transform_for(self.on_device)
        self.tensors = images_in_memory(dataset, rt.device) if self.on_device else None
        self.dataset, self.rt, self.batch, self.seed, self.workers = dataset, rt, batch, seed, cfg.data.num_workers

    def describe(self) -> str:
        kind = "on-device batches" if self.on_device else f"per-image PIL, {self.workers} loader worker(s)"
        return f"data path: {kind} ({self.why})"

    def epoch(self, order: Sequence[int], epoch: int, start_step: int):
        if self.tensors is not None:
            return TensorBatches(*self.tensors, order, batch=self.batch, start_step=start_step,
                                 transform=self.transform, seed=self.seed, epoch=epoch, rank=self.rt.rank)
        return stop_on_dead_worker(make_loader(self.dataset, self.transform, order, seed=self.seed, epoch=epoch,
                                               rank=self.rt.rank, batch=self.batch, start_step=start_step,
                                               num_workers=self.workers, device=self.rt.device), epoch)
