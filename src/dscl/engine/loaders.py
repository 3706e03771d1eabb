"""Data loaders whose every random draw is a function of (seed, epoch, position).

Each sample of an epoch is augmented under its own seed, derived from the run seed, the epoch
and its position in the epoch's order. The views of a batch are then the same whether the epoch
runs in one go or is resumed half-way, with any number of loader workers: resuming only needs
the epoch and the number of batches already done.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config import Config
from ..errors import DataError
from .distributed import Runtime
from .seeding import mix_seed, seed_everything
from .tensor_data import TensorBatches, images_in_memory, pipeline_choice


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
