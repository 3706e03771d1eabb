"""Batched view / patch augmentation of uint8 image tensors, on the images' device.

These modules take a whole batch of uint8 images ``(B,H,W,3)`` or ``(B,3,H,W)`` already in
memory and build the views of ``dscl.data.transforms`` (SPEC section 1) with per-sample random
parameters and batched tensor ops, so a CIFAR-size data set can stay on the GPU as uint8 and an
epoch needs no CPU decoding; on a CPU they replace milliseconds of PIL work per image.

- Crop-and-resize is ``grid_sample`` with per-box affine grids: one call for the query and key
  crops of the batch, one for all B*L patches (the grids of one image are stacked, so no image
  is copied per box); a flip is a negative x scale, so flips are free. It samples where
  ``roi_align(aligned=True, sampling_ratio=1)`` does (boxes are pixel edges, as for the model's
  patch teacher) and ran 2-3x faster than ``roi_align`` on this CPU (B=128, S=32, P=16, one
  thread: 4.1 vs 9.6 ms for the 2B views, 2.6 vs 5.8 ms for the patches). Unlike PIL it does
  not antialias a shrinking box (patches shrink at most ~1.6x at the default scales); identity
  crops copy pixels exactly when the side is a power of two, else to ~1e-5.
- Colour jitter uses per-sample factors and on/off masks, in the fixed order brightness,
  contrast, saturation, hue (torchvision draws a random order per image); each op is the
  per-sample form of torchvision's ``adjust_*`` on float tensors. Hue is a batched RGB -> HSV
  -> RGB round trip (torchvision's definition); a YIQ rotation is cheaper but another map.
- All random numbers come from ``generator`` (a ``torch.Generator`` on the images' device, or
  the global one when None) in a fixed order, so a batch is reproducible from a seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .transforms import IMAGENET_MEAN, IMAGENET_STD

_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_LOG_RATIO = (math.log(_RATIO[0]), math.log(_RATIO[1]))
_GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale
_TRIES = 10


def to_float(images: Tensor) -> Tensor:
    """uint8 (B,H,W,3) or (B,3,H,W) -> float32 (B,3,H,W) in [0, 1], as ``ToTensor`` scales."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    if images.dim() != 4 or 3 not in (images.shape[1], images.shape[-1]):
        raise ValueError(f"expected (B,H,W,3) or (B,3,H,W), got {tuple(images.shape)}")
    if images.shape[1] != 3:
        images = images.permute(0, 3, 1, 2)
    return images.contiguous().float().div(255)


def _uniform(shape, lo: float, hi: float, gen, device) -> Tensor:
    return torch.rand(shape, generator=gen, device=device) * (hi - lo) + lo


def _first_valid(values: Tensor, ok: Tensor) -> Tensor:
    """The value at the first True of ``ok`` along the last axis (tries), (...,T) -> (...)."""
    return values.gather(-1, ok.to(torch.uint8).argmax(-1, keepdim=True)).squeeze(-1)


def _tries(shape: tuple, area: int, scale: Sequence[float], gen, device):
    """Ten rounded (w, h) per entry: area x U(scale), aspect log-uniform in (3/4, 4/3)."""
    target = area * _uniform((*shape, _TRIES), *scale, gen, device)
    ratio = _uniform((*shape, _TRIES), *_LOG_RATIO, gen, device).exp()
    return (target * ratio).sqrt().round(), (target / ratio).sqrt().round()


def _place(size: Tensor, room: int, gen) -> Tensor:
    """Uniform integer offset in [0, room - size] per entry, as ``torch.randint`` would draw."""
    u = torch.rand(size.shape, generator=gen, device=size.device)
    return torch.minimum((u * (room - size + 1)).floor(), room - size)


def random_resized_boxes(n: int, height: int, width: int, scale: Sequence[float],
                         generator=None, device=None) -> Tensor:
    """``RandomResizedCrop.get_params`` for n crops of an H x W image -> (n,4) x1,y1,x2,y2.

    Ten tries per crop (area fraction uniform in ``scale``, log-uniform aspect ratio); the first
    whose rounded size fits wins; if none does, the central crop of clamped aspect ratio.
    """
    w, h = _tries((n,), height * width, scale, generator, device)  # (n,T) each
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    w, h, found = _first_valid(w, ok), _first_valid(h, ok), ok.any(-1)
    fw, fh = width, height  # fallback: whole image, aspect ratio clamped into _RATIO
    if width / height < _RATIO[0]:
        fh = int(round(width / _RATIO[0]))
    elif width / height > _RATIO[1]:
        fw = int(round(height * _RATIO[1]))
    w, h = torch.where(found, w, fw), torch.where(found, h, fh)
    top = torch.where(found, _place(h, height, generator), (height - fh) // 2)
    left = torch.where(found, _place(w, width, generator), (width - fw) // 2)
    return torch.stack([left, top, left + w, top + h], -1)


def random_patch_boxes(n: int, num: int, size: int, scale: Sequence[float], generator=None,
                       device=None) -> Tensor:
    """``ViewPatchTransform.sample_box`` for n S x S views, num boxes each -> (n,num,4): the
    first of ten tries whose rounded box keeps both ranges, else a square; position uniform."""
    lo, hi = scale
    w, h = _tries((n, num), size * size, scale, generator, device)  # (n,num,T) each
    frac, aspect = w * h / (size * size), w / h.clamp(min=1)
    ok = ((w > 0) & (w <= size) & (h > 0) & (h <= size) & (frac >= lo) & (frac <= hi)
          & (aspect >= _RATIO[0]) & (aspect <= _RATIO[1]))
    side = min(size, max(1, round(size * math.sqrt((lo + hi) / 2))))
    found = ok.any(-1)
    w = torch.where(found, _first_valid(w, ok), side)
    h = torch.where(found, _first_valid(h, ok), side)
    left, top = _place(w, size, generator), _place(h, size, generator)
    return torch.stack([left, top, left + w, top + h], -1)


def crop_resize(images: Tensor, boxes: Tensor, size: int, flips: Tensor | None = None) -> Tensor:
    """Cut each box of each image, resize it to size x size and mirror it where ``flips``.

    images (N,C,H,W) float; boxes (N,K,4) pixel-edge x1,y1,x2,y2; flips (N,K) bool
    -> (N,K,C,size,size). One ``grid_sample`` call: the K affine grids of image n are stacked
    along the output height, so no image is copied per box; a flip is a negative x scale.
    Bilinear, like ``roi_align(aligned=True, sampling_ratio=1)`` at the same boxes.
    """
    (n, k), (c, h, w) = boxes.shape[:2], images.shape[1:]
    if k == 0:
        return images.new_zeros(n, 0, c, size, size)
    x1, y1, x2, y2 = boxes.to(images.dtype).unbind(-1)  # (N,K) each
    scale_x = (x2 - x1) / w
    if flips is not None:
        scale_x = torch.where(flips, -scale_x, scale_x)
    zero = torch.zeros_like(x1)
    theta = torch.stack([scale_x, zero, (x1 + x2) / w - 1, zero, (y2 - y1) / h, (y1 + y2) / h - 1],
                        -1).view(n * k, 2, 3)  # maps output [-1,1]^2 onto the box
    grid = F.affine_grid(theta, [n * k, c, size, size], align_corners=False)  # (N*K,S,S,2)
    out = F.grid_sample(images, grid.view(n, k * size, size, 2), mode="bilinear",
                        padding_mode="border", align_corners=False)  # (N,C,K*S,S)
    return out.view(n, c, k, size, size).transpose(1, 2)


def grayscale(x: Tensor) -> Tensor:
    """(N,3,H,W) -> (N,1,H,W) luma."""
    r, g, b = x.unbind(1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1.0 - f) * other).clamp(0.0, 1.0)


def _shift_hue(x: Tensor, shift: Tensor) -> Tensor:
    """RGB -> HSV, hue + shift (mod 1), HSV -> RGB; x (N,3,H,W) in [0,1], shift (N,)."""
    r, g, b = x.unbind(1)  # (N,H,W) each
    maxc = torch.maximum(r, torch.maximum(g, b))
    delta = maxc - torch.minimum(r, torch.minimum(g, b))
    safe = torch.where(delta > 0, delta, 1.0)
    hue = torch.where(r == maxc, (g - b) / safe,  # a tie for the max gives the same hue
                      torch.where(g == maxc, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue = hue / 6.0 + shift.view(-1, 1, 1)  # grey pixels have hue 0
    hue = hue - hue.floor()  # mod 1, cheaper than torch.remainder on a CPU
    sat = delta / torch.where(maxc > 0, maxc, 1.0)
    # channel = v - v*s*clamp(min(k, 4-k), 0, 1), k = (m + 6h) mod 6, m = 5, 3, 1 for R, G, B
    m = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = m + 6.0 * hue.unsqueeze(1)  # (N,3,H,W), in [1, 11)
    k = torch.where(k >= 6.0, k - 6.0, k)
    v = maxc.unsqueeze(1)
    return v - v * sat.unsqueeze(1) * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def adjust_colour(x: Tensor, brightness: Tensor | None = None, contrast: Tensor | None = None,
                  saturation: Tensor | None = None, hue: Tensor | None = None) -> Tensor:
    """Per-sample colour jitter with explicit factors, applied in this fixed order.

    x (N,3,H,W) in [0,1]; each factor (N,) or None to skip. Factor 1 (hue 0) leaves a sample
    exactly unchanged. Each op equals torchvision's ``adjust_<op>`` of one float image.
    """
    if brightness is not None:
        x = (x * brightness.view(-1, 1, 1, 1)).clamp(0.0, 1.0)
    if contrast is not None:
        x = _blend(x, grayscale(x).mean((1, 2, 3), keepdim=True), contrast)
    if saturation is not None:
        x = _blend(x, grayscale(x), saturation)
    if hue is not None:
        x = torch.where((hue != 0).view(-1, 1, 1, 1), _shift_hue(x, hue), x)
    return x


def gaussian_blur(x: Tensor, sigma: Tensor, radius: int = 6) -> Tensor:
    """Per-sample Gaussian blur, x (N,C,H,W), sigma (N,) <= radius / 3; reflect padding."""
    n, c, h, w = x.shape
    radius = max(0, min(radius, h - 1, w - 1))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t / sigma.to(x.dtype).view(-1, 1)) ** 2)  # (N,K)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (N*C,K)
    y = F.pad(x.reshape(1, n * c, h, w), (radius,) * 4, mode="reflect")
    y = F.conv2d(y, kernel.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(y, kernel.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


def random_photometric(x: Tensor, hue: float, p_jitter: float, p_gray: float, blur: bool,
                       generator=None) -> Tensor:
    """Jitter (0.4, 0.4, 0.4, hue) with prob. p_jitter, grayscale p_gray, blur p=0.5 if blur.
    x (N,3,H,W) in [0,1]; the random numbers drawn do not depend on the outcomes."""
    n, dev = x.shape[0], x.device
    on = torch.rand(n, generator=generator, device=dev) < p_jitter
    bcs = torch.where(on[:, None], _uniform((n, 3), 0.6, 1.4, generator, dev), 1.0)
    shift = _uniform(n, -hue, hue, generator, dev) * on if hue > 0 else None
    x = adjust_colour(x, *bcs.unbind(1), shift)
    if p_gray > 0:
        gray = torch.rand(n, generator=generator, device=dev) < p_gray
        x = torch.where(gray.view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)
    if blur:
        sigma = _uniform(n, 0.1, 2.0, generator, dev)
        blurred = torch.rand(n, generator=generator, device=dev) < 0.5
        x = torch.where(blurred.view(-1, 1, 1, 1), gaussian_blur(x, sigma), x)
    return x


class _BatchedTransform(nn.Module):
    """Output size and normalisation shared by the batched transforms (uint8 batch in)."""

    def __init__(self, size: int, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def normalise(self, x: Tensor) -> Tensor:
        """(N,3,H,W) in [0,1] -> (x - mean) / std, as ``transforms.Normalize``."""
        return x.sub(self.mean.to(x.device)).div(self.std.to(x.device))


class BatchedViewPatch(_BatchedTransform):
    """Stage-1 views of a batch: query g1, key g2, L patches and their boxes (SPEC section 1).

    ``forward(images, generator)`` -> ``(query (B,3,S,S), key (B,3,S,S), patches (B,L,3,P,P),
    boxes (B,L,4) float32)``, as ``ViewPatchTransform`` per image: boxes are integer pixel
    edges in g1 after its flip; patches are cut from g1 before its colour ops, resized to P x P,
    then flipped and coloured on their own. ``photometric=False`` turns off colour, grayscale
    and blur (flips stay). ``num_patches=0`` gives empty patches and boxes.
    """

    def __init__(self, size: int, patch_size: int, num_patches: int = 5,
                 query_scale: tuple[float, float] = (0.2, 1.0),
                 key_scale: tuple[float, float] = (0.2, 1.0),
                 patch_scale: tuple[float, float] = (0.05, 0.6), blur: bool = False,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 photometric: bool = True) -> None:
        super().__init__(size, mean, std)
        if size < 1 or patch_size < 1 or num_patches < 0:
            raise ValueError(f"need size, patch_size >= 1 and num_patches >= 0, got {size}, "
                             f"{patch_size}, {num_patches}")
        if not 0 < patch_scale[0] <= patch_scale[1] <= 1:
            raise ValueError(f"patch_scale must satisfy 0 < lo <= hi <= 1, got {patch_scale}")
        self.patch_size, self.num_patches = patch_size, num_patches
        self.query_scale, self.key_scale, self.patch_scale = query_scale, key_scale, patch_scale
        self.blur, self.photometric = blur, photometric

    def forward(self, images: Tensor, generator: torch.Generator | None = None):
        x = to_float(images)  # (B,3,H,W)
        (b, _, h, w), dev, s, p, n = x.shape, x.device, self.size, self.patch_size, self.num_patches
        crops = torch.stack([random_resized_boxes(b, h, w, self.query_scale, generator, dev),
                             random_resized_boxes(b, h, w, self.key_scale, generator, dev)], 1)
        flips = torch.rand(b, 2, generator=generator, device=dev) < 0.5
        views = crop_resize(x, crops, s, flips)  # (B,2,3,S,S): cropped, resized, flipped
        query, key = views[:, 0].contiguous(), views[:, 1].contiguous()  # geometric g1, g2
        boxes = random_patch_boxes(b, n, s, self.patch_scale, generator, dev)  # (B,L,4)
        flips = torch.rand(b, n, generator=generator, device=dev) < 0.5
        patches = crop_resize(query, boxes, p, flips).reshape(b * n, 3, p, p)
        if self.photometric:
            query = random_photometric(query, 0.1, 0.8, 0.2, self.blur, generator)
            key = random_photometric(key, 0.0, 1.0, 0.0, False, generator)
            patches = random_photometric(patches, 0.1, 0.8, 0.2, self.blur, generator)
        patches = self.normalise(patches).view(b, n, 3, p, p)
        return self.normalise(query), self.normalise(key), patches, boxes


class BatchedQueryView(_BatchedTransform):
    """The g1 pipeline alone (stage-2 training augmentation): uint8 batch -> (B,3,S,S)."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.2, 1.0), blur: bool = False,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 photometric: bool = True) -> None:
        super().__init__(size, mean, std)
        self.scale, self.blur, self.photometric = scale, blur, photometric

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        x = _random_crop_flip(to_float(images), self.size, self.scale, generator)
        if self.photometric:
            x = random_photometric(x, 0.1, 0.8, 0.2, self.blur, generator)
        return self.normalise(x)


def _random_crop_flip(x: Tensor, size: int, scale, generator) -> Tensor:
    """RandomResizedCrop + horizontal flip, (B,3,H,W) -> (B,3,S,S)."""
    (b, _, h, w), dev = x.shape, x.device
    boxes = random_resized_boxes(b, h, w, scale, generator, dev)[:, None]  # (B,1,4)
    flips = torch.rand(b, 1, generator=generator, device=dev) < 0.5
    return crop_resize(x, boxes, size, flips)[:, 0]


def _resize(x: Tensor, size: int) -> Tensor:
    """Bilinear antialiased resize to size x size (torchvision's tensor Resize), if needed."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, (size, size), mode="bilinear", align_corners=False, antialias=True)


class BatchedCETransform(_BatchedTransform):
    """Supervised baseline augmentation: at S <= 64 a random S x S crop of the image (resized
    to S x S first if needed) zero-padded by 4 px, + flip; above, RandomResizedCrop + flip."""

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        x, s = to_float(images), self.size
        if s > 64:
            return self.normalise(_random_crop_flip(x, s, (0.08, 1.0), generator))
        b, dev = x.shape[0], x.device
        padded = F.pad(_resize(x, s), (4, 4, 4, 4))  # (B,3,S+8,S+8), zero border
        offset = (torch.rand(b, 2, generator=generator, device=dev) * 9).floor().clamp(max=8).long()
        flips = torch.rand(b, 1, generator=generator, device=dev) < 0.5
        span = torch.arange(s, device=dev)
        rows = offset[:, 1:] + span  # (B,S)
        cols = offset[:, :1] + torch.where(flips, s - 1 - span, span)  # a flip reverses columns
        x = padded[torch.arange(b, device=dev)[:, None, None, None],
                   torch.arange(3, device=dev)[None, :, None, None],
                   rows[:, None, :, None], cols[:, None, None, :]]  # (B,3,S,S), exact pixels
        return self.normalise(x)


class BatchedEval(_BatchedTransform):
    """Test-time transform: to float, resize to S x S if stored at another size, normalise.

    Unlike ``eval_transform`` above 64 px there is no centre crop: store images at S already.
    """

    def forward(self, images: Tensor) -> Tensor:
        return self.normalise(_resize(to_float(images), self.size))
