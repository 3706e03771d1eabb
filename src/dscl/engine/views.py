"""Which transform each stage uses, with the size-dependent defaults of SPEC section 1."""

from __future__ import annotations

from ..config import Config
from ..data import (CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD, ViewPatchTransform, ce_train_transform,
                    eval_transform, query_view_transform)


def _small(size: int) -> bool:
    return size <= 64


def normalisation(size: int):
    return (CIFAR_MEAN, CIFAR_STD) if _small(size) else (IMAGENET_MEAN, IMAGENET_STD)


def crop_scale(cfg: Config, size: int) -> tuple[float, float]:
    return cfg.pretrain.crop_scale or ((0.2, 1.0) if _small(size) else (0.08, 1.0))


def patch_size(cfg: Config, size: int) -> int:
    return cfg.pretrain.patch_size or (size // 2 if _small(size) else 64)


def stage1_transform(cfg: Config, size: int):
    mean, std = normalisation(size)
    if cfg.method == "ce":
        return ce_train_transform(size, mean, std)
    scale = crop_scale(cfg, size)
    return ViewPatchTransform(size, patch_size(cfg, size), num_patches=cfg.pretrain.num_patches if cfg.uses_pbsd else 0,
                              query_scale=scale, key_scale=scale, patch_scale=cfg.pretrain.patch_scale,
                              blur=not _small(size), mean=mean, std=std)


def linear_transform(cfg: Config, size: int):
    mean, std = normalisation(size)
    return query_view_transform(size, scale=crop_scale(cfg, size), blur=not _small(size), mean=mean, std=std)


def test_transform(size: int):
    mean, std = normalisation(size)
    return eval_transform(size, mean, std)
