"""Image transforms: the query / key / patch views of stage 1 and the usual supervised ones.

Everything runs on PIL images with torchvision's v1 transforms, which are the faster choice on
32-px images (no tensor round trip per op). All randomness comes from torch's global generator,
so ``torch.manual_seed`` (and the per-worker seeding of ``DataLoader``) makes the views
reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image, ImageFilter
from torch import Tensor
from torchvision import transforms as T
from torchvision.transforms import functional as F

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RATIO = (3.0 / 4.0, 4.0 / 3.0)


class GaussianBlur:
    """PIL Gaussian blur with sigma uniform in ``sigma`` (MoCo v2's augmentation)."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.sigma = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        s = float(torch.empty(1).uniform_(self.sigma[0], self.sigma[1]))
        return img.filter(ImageFilter.GaussianBlur(radius=s))


def _photometric(hue: float, p_jitter: float, p_gray: float, blur: bool) -> list:
    """Colour jitter (0.4, 0.4, 0.4, hue) with probability p_jitter, grayscale, optional blur."""
    ops: list = [T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, hue)], p=p_jitter)]
    if p_gray > 0:
        ops.append(T.RandomGrayscale(p=p_gray))
    if blur:
        ops.append(T.RandomApply([GaussianBlur()], p=0.5))
    return ops


def _to_normalized(mean: Sequence[float], std: Sequence[float]) -> list:
    return [T.ToTensor(), T.Normalize(mean, std)]


STRONG_AUGMENTS = ("none", "autoaugment", "randaugment")


def strong_augment(policy: str, size: int) -> list:
    """The strong augmentation of the contrastive CIFAR-LT peers, as PIL ops: torchvision's
    AutoAugment (CIFAR-10 policy at <= 64 px, ImageNet's above) or RandAugment (2 ops,
    magnitude 9); ``none``: nothing."""
    if policy == "autoaugment":
        return [T.AutoAugment(T.AutoAugmentPolicy.CIFAR10 if size <= 64 else T.AutoAugmentPolicy.IMAGENET)]
    if policy == "randaugment":
        return [T.RandAugment()]
    if policy == "none":
        return []
    raise ValueError(f"strong augmentation must be one of {STRONG_AUGMENTS}, got {policy!r}")


def _erasing(p: float) -> list:
    """Cutout as torchvision's RandomErasing with probability p (after normalisation)."""
    return [T.RandomErasing(p=p)] if p > 0 else []


class ViewPatchTransform:
    """Stage-1 views of one image (the paper's Sec. 3, supplement Alg. 1): query g1, key g2, L patches, boxes.

    Returns ``(query (3,S,S), key (3,S,S), patches (L,3,P,P), boxes (L,4) float32)``. Boxes are
    integer pixel-edge coordinates ``(x1, y1, x2, y2)`` in the query view after its flip, so
    ``torchvision.ops.roi_align(query[None], [boxes], ..., aligned=True)`` covers exactly the
    pixels each patch was cut from. Patches are cut from the query view before its colour
    jitter, resized to P x P, then get their own flip and photometric augmentation.
    ``photometric=False`` switches off every colour, grayscale and blur op (flips stay).
    ``strong`` (:func:`strong_augment`) and ``erasing`` (RandomErasing's probability) apply to the
    key view only: on the query view the geometric ops of AutoAugment / RandAugment would move
    its content away from the patch boxes, and the query stays the same for every method.
    """

    def __init__(
        self,
        size: int,
        patch_size: int,
        num_patches: int = 5,
        query_scale: tuple[float, float] = (0.2, 1.0),
        key_scale: tuple[float, float] = (0.2, 1.0),
        patch_scale: tuple[float, float] = (0.05, 0.6),
        blur: bool = False,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        photometric: bool = True,
        strong: str = "none",
        erasing: float = 0.0,
    ) -> None:
        if size < 1 or patch_size < 1 or num_patches < 0:
            raise ValueError(f"size and patch_size must be >= 1 and num_patches >= 0, got {size}, "
                             f"{patch_size}, {num_patches}")
        if not 0 < patch_scale[0] <= patch_scale[1] <= 1:
            raise ValueError(f"patch_scale must satisfy 0 < lo <= hi <= 1, got {patch_scale}")
        self.size, self.patch_size, self.num_patches = size, patch_size, num_patches
        self.patch_scale = patch_scale
        self.query_crop = T.RandomResizedCrop(size, scale=query_scale)
        self.key_crop = T.RandomResizedCrop(size, scale=key_scale)
        self.flip = T.RandomHorizontalFlip()
        normalize = T.Compose(_to_normalized(mean, std))
        if photometric:
            query_colour = _photometric(0.1, 0.8, 0.2, blur)
            key_colour = _photometric(0.0, 1.0, 0.0, False)
            patch_colour = _photometric(0.1, 0.8, 0.2, blur)
        else:
            query_colour = key_colour = patch_colour = []
        self.query_post = T.Compose([*query_colour, normalize])
        self.key_view = T.Compose([self.key_crop, *key_colour, self.flip, *strong_augment(strong, size), normalize,
                                   *_erasing(erasing)])
        self.patch_post = T.Compose([self.flip, *patch_colour, normalize])

    def sample_box(self) -> tuple[int, int, int, int]:
        """One integer box (x1, y1, x2, y2) inside the S x S query view (supplement Alg. 1).

        Area fraction uniform in ``patch_scale``, aspect ratio log-uniform in (3/4, 4/3),
        position uniform. Drawn sizes are rounded to whole pixels and redrawn (up to 10 times)
        until the rounded box still respects both ranges; the fallback is a centred-area square.
        """
        s = self.size
        lo, hi = self.patch_scale
        log_ratio = (math.log(_RATIO[0]), math.log(_RATIO[1]))
        for _ in range(10):
            area = s * s * float(torch.empty(1).uniform_(lo, hi))
            ratio = math.exp(float(torch.empty(1).uniform_(*log_ratio)))
            w = round(math.sqrt(area * ratio))
            h = round(math.sqrt(area / ratio))
            if not (0 < w <= s and 0 < h <= s):
                continue
            if lo <= w * h / (s * s) <= hi and _RATIO[0] <= w / h <= _RATIO[1]:
                break
        else:
            w = h = min(s, max(1, round(s * math.sqrt((lo + hi) / 2))))
        left = int(torch.randint(0, s - w + 1, (1,)))
        top = int(torch.randint(0, s - h + 1, (1,)))
        return left, top, left + w, top + h

    def sample_geometry(self, img: Image.Image) -> tuple[Image.Image, Tensor]:
        """The geometric query view g1 (crop + flip, no colour) and its L boxes, (L,4) float32."""
        g1 = self.flip(self.query_crop(img))
        boxes = torch.tensor([self.sample_box() for _ in range(self.num_patches)],
                             dtype=torch.float32).reshape(self.num_patches, 4)
        return g1, boxes

    def patch(self, g1: Image.Image, box: Sequence[float]) -> Tensor:
        """The patch of ``g1`` at ``box``: cut, resized to P x P, own flip and colour. (3,P,P)"""
        x1, y1, x2, y2 = (int(v) for v in box)
        crop = g1.crop((x1, y1, x2, y2))
        return self.patch_post(F.resize(crop, [self.patch_size, self.patch_size]))

    def __call__(self, img: Image.Image) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        g1, boxes = self.sample_geometry(img)
        query = self.query_post(g1)  # (3,S,S)
        key = self.key_view(img)  # (3,S,S)
        patches = [self.patch(g1, b.tolist()) for b in boxes]
        patches = (torch.stack(patches) if patches
                   else query.new_zeros(0, 3, self.patch_size, self.patch_size))  # (L,3,P,P)
        return query, key, patches, boxes

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, patch_size={self.patch_size}, "
                f"num_patches={self.num_patches}, patch_scale={self.patch_scale})")


def query_view_transform(
    size: int,
    scale: tuple[float, float] = (0.2, 1.0),
    blur: bool = False,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> T.Compose:
    """The g1 pipeline alone (stage-2 training augmentation, as the paper's stage 2)."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=scale),
        T.RandomHorizontalFlip(),
        *_photometric(0.1, 0.8, 0.2, blur),
        *_to_normalized(mean, std),
    ])


def ce_train_transform(
    size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    strong: str = "none",
    erasing: float = 0.0,
) -> T.Compose:
    """The usual supervised augmentation: pad-4 random crop + flip at <= 64 px, else RRC + flip;
    then ``strong`` (:func:`strong_augment`) and RandomErasing with probability ``erasing``."""
    if size <= 64:
        crop = [T.Resize((size, size)), T.RandomCrop(size, padding=4)]
    else:
        crop = [T.RandomResizedCrop(size)]
    return T.Compose([*crop, T.RandomHorizontalFlip(), *strong_augment(strong, size), *_to_normalized(mean, std),
                      *_erasing(erasing)])


def eval_transform(
    size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> T.Compose:
    """Deterministic test-time transform: at <= 64 px the image as is (resized to S x S if it
    differs); above, resize the short side to S * 256/224 then centre-crop S."""
    if size <= 64:
        # PIL returns an unchanged copy when the image already has this size.
        geometry = [T.Resize((size, size))]
    else:
        geometry = [T.Resize(int(size * 256 / 224)), T.CenterCrop(size)]
    return T.Compose([*geometry, *_to_normalized(mean, std)])
