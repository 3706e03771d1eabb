"""Which transform each stage uses, per-image (PIL) or batched on the device, with the
size-dependent defaults (crop scale, patch size, blur) of 224-px photographs and small images."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from ..config import Config
from ..errors import ConfigError
from ..data import (CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD, TransformedDataset, ViewPatchTransform,
                    ce_train_transform, eval_transform, query_view_transform)
from ..data import batched
from ..data.loading import eval_batches
from .loaders import pipeline_choice


def _small(size: int) -> bool:
    return size <= 64


def normalisation(size: int):
    return (CIFAR_MEAN, CIFAR_STD) if _small(size) else (IMAGENET_MEAN, IMAGENET_STD)


def crop_scale(cfg: Config, size: int) -> tuple[float, float]:
    return cfg.pretrain.crop_scale or ((0.2, 1.0) if _small(size) else (0.08, 1.0))


def patch_size(cfg: Config, size: int) -> int:
    return cfg.pretrain.patch_size or (size // 2 if _small(size) else 64)


def stage1_transform(cfg: Config, size: int, on_device: bool = False):
    mean, std = normalisation(size)
    p = cfg.pretrain
    strong = {"strong": p.strong_augment, "erasing": p.random_erasing}
    if on_device and (p.strong_augment != "none" or p.random_erasing > 0):
        raise ConfigError("pretrain.strong_augment / pretrain.random_erasing: only the per-image data path has "
                          "them; set data.pipeline: pil")
    if not cfg.method_spec.contrastive:
        return (batched.BatchedCETransform(size, mean=mean, std=std) if on_device
                else ce_train_transform(size, mean, std, **strong))
    scale = crop_scale(cfg, size)
    views = dict(num_patches=p.num_patches if cfg.uses_pbsd else 0, query_scale=scale, key_scale=scale,
                 patch_scale=p.patch_scale, blur=not _small(size), mean=mean, std=std)
    if on_device:
        return batched.BatchedViewPatch(size, patch_size(cfg, size), **views)
    return ViewPatchTransform(size, patch_size(cfg, size), **views, **strong)


def linear_transform(cfg: Config, size: int, on_device: bool = False):
    mean, std = normalisation(size)
    kind = batched.BatchedQueryView if on_device else query_view_transform
    return kind(size, scale=crop_scale(cfg, size), blur=not _small(size), mean=mean, std=std)


def split_loader(cfg: Config, dataset: Dataset, size: int, device: torch.device):
    """:func:`eval_loader` of a split with the run's settings (data path, batch, workers)."""
    return eval_loader(dataset, size, on_device=pipeline_choice(cfg, dataset)[0], batch=cfg.eval_batch_size,
                       device=device, num_workers=cfg.data.num_workers)


def eval_loader(dataset: Dataset, size: int, *, on_device: bool, batch: int, device: torch.device,
                num_workers: int = 0):
    """Batches (images, labels) of a whole split for evaluation, in order, un-augmented."""
    mean, std = normalisation(size)
    if on_device:
        return list(eval_batches(dataset, batched.BatchedEval(size, mean=mean, std=std), batch, device))
    return DataLoader(TransformedDataset(dataset, eval_transform(size, mean, std)), batch_size=batch,
                      shuffle=False, num_workers=num_workers)
