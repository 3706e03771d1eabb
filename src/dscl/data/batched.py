"""Batched view / patch augmentation of uint8 image tensors, on the images' device.

These modules take a whole batch of uint8 images ``(B,H,W,3)`` or ``(B,3,H,W)`` already in
memory and build the views of ``dscl.data.transforms`` with per-sample random
parameters and batched tensor ops, so a CIFAR-size data set can stay on the GPU as uint8 and an
epoch needs no CPU decoding; on a CPU they replace milliseconds of PIL work per image.

A step on a GPU is paced by how many operators the host launches, so the stage-1 views are a
fixed, small number of operators whatever the batch size or the number of patches (93 at
CIFAR size, ``benchmarks/op_count.py``):

- One ``torch.rand`` call draws every random number of the batch: per column (one crop or
  patch of one image) ten (area, aspect) tries, a position, four events (flip, jitter,
  grayscale, blur) and four colour factors. The query, key and patch boxes of the batch are
  sampled together, each column with its own rule (RandomResizedCrop's or supplement Alg. 1's).
- Crop-and-resize is ``grid_sample`` with per-box affine grids: one call for the query and key
  crops of the batch, one for all B*L patches (the grids of one image are stacked, so no image
  is copied per box); a flip is a negative x scale, so flips are free. It samples where
  ``roi_align(aligned=True, sampling_ratio=1)`` does (boxes are pixel edges, as for the model's
  patch teacher). Unlike PIL it does not antialias a shrinking box (patches shrink at most
  ~1.6x at the default scales); identity crops copy pixels exactly when the side is a power of
  two, else to ~1e-5.
- The photometric ops run once over the key, query and patch pixels of the batch laid side by
  side, ``(B,3,M)``, with each column's factors spread over its pixels (hue and grayscale over
  the query's and patches' only). Colour jitter uses the
  fixed order brightness, contrast, saturation, hue (torchvision draws a random order per
  image); each op is the per-sample form of torchvision's ``adjust_*`` on float tensors, a
  factor of 1 (hue 0) leaving a sample exactly unchanged. Hue is torchvision's RGB -> HSV ->
  RGB round trip, in closed form; a YIQ rotation is cheaper but another map. Channel mixing is
  elementwise (no matmul or convolution, whose TF32 modes would round colours on a GPU).
- All random numbers come from ``generator`` (a ``torch.Generator`` on the images' device, or
  the global one when None), so a batch is reproducible from a seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .transforms import IMAGENET_MEAN, IMAGENET_STD

_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_LOG_RATIO = (math.log(_RATIO[0]), math.log(_RATIO[1]))
_GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale
_TRIES = 10
# The random numbers of one column, in the last axis of the batch's one draw.
_AREA = slice(0, _TRIES)  # area fraction of each try
_ASPECT = slice(_TRIES, 2 * _TRIES)  # log aspect ratio of each try
_POS = slice(2 * _TRIES, 2 * _TRIES + 2)  # x, y offset
_EVENTS = slice(2 * _TRIES + 2, 2 * _TRIES + 6)  # flip, jitter, grayscale, blur
_FACTORS = slice(2 * _TRIES + 6, 2 * _TRIES + 10)  # brightness, contrast, saturation, hue
_SIGMA = 2 * _TRIES + 10  # blur sigma
_NUM_RANDOM = 2 * _TRIES + 11
_BOX_RANDOM = 2 * _TRIES + 2  # what a box alone needs
_HUE_BASE = (5.0, 3.0, 1.0)  # HSV -> RGB: channel c peaks where (base_c + 6 hue) mod 6 is in [1, 3]
_NO_JITTER = (1.0, 0.0, 0.0, 0.0)  # brightness, 1 - contrast, 1 - saturation, hue shift


def to_float(images: Tensor) -> Tensor:
    """uint8 (B,H,W,3) or (B,3,H,W) -> float32 (B,3,H,W) in [0, 1], as ``ToTensor`` scales."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    if images.dim() != 4 or 3 not in (images.shape[1], images.shape[-1]):
        raise ValueError(f"expected (B,H,W,3) or (B,3,H,W), got {tuple(images.shape)}")
    if images.shape[1] != 3:
        images = images.permute(0, 3, 1, 2)  # a strided view; grid_sample reads it as it is
    return images.float().div_(255)


@dataclass(frozen=True)
class _Column:
    """One crop of each image of a batch: where its box is drawn and how it is coloured."""

    room: tuple[int, int]  # (width, height) of the image the box is drawn in
    scale: tuple[float, float]  # area fraction of the box
    patch: bool = False  # supplement Alg. 1's rule rather than RandomResizedCrop's
    p_jitter: float = 0.0
    hue: float = 0.0
    p_gray: float = 0.0
    blur: bool = False


def _box_rule(col: _Column):
    """Per-column constants of the box sampler: bounds on (w, h, area, w/h) of a try, the
    fallback size and, for a crop, its centred position."""
    (w, h), (lo, hi) = col.room, col.scale
    if col.patch:  # both ranges hold for the rounded box; the fallback square is placed at random
        side = min(w, h, max(1, round(w * math.sqrt((lo + hi) / 2))))
        return ([0.5, 0.5, lo * w * h, _RATIO[0]], [w, h, hi * w * h, _RATIO[1]], (side, side),
                (0, 0))
    fw, fh = w, h  # RandomResizedCrop's fallback: whole image, aspect ratio clamped into _RATIO
    if w / h < _RATIO[0]:
        fh = int(round(w / _RATIO[0]))
    elif w / h > _RATIO[1]:
        fw = int(round(h * _RATIO[1]))
    inf = math.inf
    return [0.5, 0.5, -inf, -inf], [w, h, inf, inf], (fw, fh), ((w - fw) // 2, (h - fh) // 2)


class _Plan:
    """Constants of one batch layout, made once per (columns, device): the box rules, the affine
    maps, the colour parameters of each column and the pixel layout ``groups`` of the joint
    ``(B,3,M)`` tensor, ``(offset, columns, side)`` per run of equal-size crops."""

    def __init__(self, columns: Sequence[_Column], groups: Sequence[tuple[int, int, int]],
                 device) -> None:
        def t(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device)

        self.columns, self.groups, self.num = tuple(columns), tuple(groups), len(columns)
        rules = [_box_rule(c) for c in columns]
        area = [c.room[0] * c.room[1] for c in columns]
        self.area_lo = t([[a * c.scale[0]] for a, c in zip(area, columns)])  # (G,1)
        self.area_span = t([[a * (c.scale[1] - c.scale[0])] for a, c in zip(area, columns)])
        half = (0.5 * _LOG_RATIO[0], 0.5 * (_LOG_RATIO[1] - _LOG_RATIO[0]))
        self.aspect_lo, self.aspect_span = t([half[0], -half[0]]), t([half[1], -half[1]])
        self.lower = t([[r[0]] for r in rules])  # (G,1,4): w, h, area, w/h
        self.upper = t([[r[1]] for r in rules])
        self.fallback, self.centre = t([r[2] for r in rules]), t([r[3] for r in rules])  # (G,2)
        self.room = t([c.room for c in columns])
        self.place = t([[c.patch] for c in columns], torch.bool)  # (G,1): random fallback place
        self.try_rank = t(list(range(_TRIES, 0, -1)))  # T, ..., 1: earlier tries rank higher
        # theta = c6 + (box @ m) / den: [sx, 0, tx, 0, sy, ty] of the box's map from [-1, 1]^2
        m = torch.zeros(4, 6)
        m[0, 0], m[2, 0], m[0, 2], m[2, 2] = -1, 1, 1, 1
        m[1, 4], m[3, 4], m[1, 5], m[3, 5] = -1, 1, 1, 1
        mirror = m.clone()
        mirror[:, 0] = -mirror[:, 0]  # a flip is a negative x scale
        self.m, self.m_flip = m.to(device), mirror.to(device)
        self.c6 = t([0.0, 0.0, -1.0, 0.0, 0.0, -1.0])
        self.den = t([[w, 1, w, 1, h, h] for w, h in (c.room for c in columns)])  # (G,6)
        # colour: flip, jitter, grayscale and blur probabilities, factor ranges (hue as 6 x shift)
        self.probs = t([[0.5, c.p_jitter, c.p_gray, 0.5 if c.blur else 0.0] for c in columns])
        # brightness, 1 - contrast, 1 - saturation, 6 x hue shift: jitter (0.4, 0.4, 0.4, hue)
        self.factor_lo = t([[0.6, 0.4, 0.4, -6 * c.hue] for c in columns])
        self.factor_span = t([[0.8, -0.8, -0.8, 12 * c.hue] for c in columns])
        self.no_jitter, self.hue_base = t(_NO_JITTER), t(_HUE_BASE)
        self.events_on = t([[float(c.hue > 0) for c in columns], [1.0] * len(columns)])  # hue, grey
        self.any_hue = any(c.hue > 0 for c in columns)
        self.any_gray = any(c.p_gray > 0 for c in columns)
        self.any_blur = any(c.blur for c in columns)
        self.luma = t(_GRAY).view(1, 3, 1)
        first = [sum(g[1] for g in groups[:i]) for i in range(len(groups))]
        self.segment = torch.cat([torch.zeros(0, dtype=torch.long)] + [
            torch.arange(f, f + n).repeat_interleave(s * s) for f, (_, n, s) in zip(first, groups)
        ]).to(device)  # (M,): the column of each pixel
        # Hue and grayscale run on the pixels from the first column that may have them on.
        coloured = [i for i, c in enumerate(columns) if c.hue > 0 or c.p_gray > 0]
        self.coloured_from = int((self.segment < coloured[0]).sum()) if coloured else None

    def spread(self, values: Tensor) -> Tensor:
        """(B,K,G) per column -> (B,K,M) per pixel."""
        (b, rows, g), m = values.shape, self.segment.numel()
        return values.reshape(b * rows, g, 1).index_select(1, self.segment).view(b, rows, m)

    def segment_mean(self, x: Tensor) -> Tensor:
        """(B,1,M) -> the mean of each column's pixels, spread over them, (B,1,M)."""
        b = x.shape[0]
        means = [x[..., a:a + n * s * s].view(b, 1, n, s * s).mean(-1) for a, n, s in self.groups]
        return self.spread(means[0] if len(means) == 1 else torch.cat(means, -1))  # from (B,1,G)


_PLANS: dict = {}


def _plan(columns: Sequence[_Column], groups: Sequence[tuple[int, int, int]], device) -> _Plan:
    key = (tuple(columns), tuple(groups), torch.device(device) if device is not None else None)
    if key not in _PLANS:
        if len(_PLANS) >= 64:  # a few layouts are in use at a time; image sizes may vary
            _PLANS.clear()
        _PLANS[key] = _Plan(columns, groups, device)
    return _PLANS[key]


def _sample_boxes(u: Tensor, k: _Plan) -> Tensor:
    """(B,G,>=22) uniforms -> (B,G,4) integer x1,y1,x2,y2 (float), one box per column.

    Ten tries per box (area fraction uniform in the column's scale, aspect ratio log-uniform in
    (3/4, 4/3)); the first whose rounded size fits the column's bounds wins, else its fallback.
    """
    target = torch.addcmul(k.area_lo, u[..., _AREA], k.area_span)  # (B,G,T) area in pixels
    stretch = torch.addcmul(k.aspect_lo, u[..., _ASPECT, None], k.aspect_span).exp_()  # r^(1/2), r^(-1/2)
    wh = stretch.mul_(target.sqrt_()[..., None]).round_()  # (B,G,T,2) rounded w, h
    feats = torch.cat([wh, wh.prod(-1, keepdim=True), wh[..., :1] / wh[..., 1:]], -1)
    ok = (feats.clamp(k.lower, k.upper) == feats).all(-1)  # (B,G,T); NaN (0/0) fails too
    score, first = (ok * k.try_rank).max(-1)  # the first try that fits: a unique max on any device
    found = score > 0
    wh = wh.gather(-2, first[..., None, None].expand(*first.shape, 1, 2)).squeeze(-2)
    wh = torch.where(found[..., None], wh, k.fallback)  # (B,G,2)
    room = k.room - wh
    xy = torch.minimum(torch.addcmul(u[..., _POS], u[..., _POS], room).floor_(), room)  # uniform
    xy = torch.where(found[..., None] | k.place, xy, k.centre)
    return torch.cat([xy, xy + wh], -1)


def random_resized_boxes(n: int, height: int, width: int, scale: Sequence[float],
                         generator=None, device=None) -> Tensor:
    """``RandomResizedCrop.get_params`` for n crops of an H x W image -> (n,4) x1,y1,x2,y2.

    Ten tries per crop (area fraction uniform in ``scale``, log-uniform aspect ratio); the first
    whose rounded size fits wins; if none does, the central crop of clamped aspect ratio.
    """
    k = _plan([_Column((width, height), tuple(scale))], [], device)
    u = torch.rand(n, 1, _BOX_RANDOM, generator=generator, device=device)
    return _sample_boxes(u, k)[:, 0]


def random_patch_boxes(n: int, num: int, size: int, scale: Sequence[float], generator=None,
                       device=None) -> Tensor:
    """``ViewPatchTransform.sample_box`` for n S x S views, num boxes each -> (n,num,4): the
    first of ten tries whose rounded box keeps both ranges, else a square; position uniform."""
    k = _plan([_Column((size, size), tuple(scale), patch=True)] * num, [], device)
    u = torch.rand(n, num, _BOX_RANDOM, generator=generator, device=device)
    return _sample_boxes(u, k)


def _theta(boxes: Tensor, flips: Tensor, k: _Plan) -> Tensor:
    """(B,G,4) pixel-edge boxes, (B,G) flips -> (B,G,2,3) maps of the output [-1,1]^2 onto them."""
    m = torch.where(flips[..., None, None], k.m_flip, k.m)  # (B,G,4,6)
    pixels = (boxes[..., None] * m).sum(-2)  # (B,G,6): x2 - x1, 0, x1 + x2, 0, y2 - y1, y1 + y2
    return torch.addcdiv(k.c6, pixels, k.den).view(*boxes.shape[:2], 2, 3)


def _crop(images: Tensor, theta: Tensor, size: int) -> Tensor:
    """images (N,C,H,W), theta (N,K,2,3) -> (N,C,K*size,size), the K crops of image n stacked
    along the height. One ``grid_sample`` call, bilinear, like ``roi_align(aligned=True,
    sampling_ratio=1)`` at the same boxes."""
    n, k = theta.shape[:2]
    grid = F.affine_grid(theta.reshape(n * k, 2, 3), [n * k, 1, size, size], align_corners=False)
    return F.grid_sample(images, grid.view(n, k * size, size, 2), mode="bilinear",
                         padding_mode="border", align_corners=False)


def crop_resize(images: Tensor, boxes: Tensor, size: int, flips: Tensor | None = None) -> Tensor:
    """Cut each box of each image, resize it to size x size and mirror it where ``flips``.

    images (N,C,H,W) float; boxes (N,K,4) pixel-edge x1,y1,x2,y2; flips (N,K) bool
    -> (N,K,C,size,size).
    """
    (n, kk), (c, h, w) = boxes.shape[:2], images.shape[1:]
    if kk == 0:
        return images.new_zeros(n, 0, c, size, size)
    k = _plan([_Column((w, h), (1.0, 1.0))] * kk, [], images.device)
    flips = torch.zeros(n, kk, dtype=torch.bool, device=images.device) if flips is None else flips
    out = _crop(images, _theta(boxes.to(images.dtype), flips, k), size)
    return out.view(n, c, kk, size, size).transpose(1, 2)


def _luma(x: Tensor, weights: Tensor) -> Tensor:
    """(N,3,M) -> (N,1,M), torchvision's rgb_to_grayscale (in its order, no (N,3,M) temporary)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return torch.addcmul(torch.addcmul(r * weights[:, 0:1], g, weights[:, 1:2]), b, weights[:, 2:3])


def _hue(x: Tensor, shift: Tensor, base: Tensor) -> Tensor:
    """RGB -> HSV, hue + shift (mod 1), HSV -> RGB; x (N,3,M) in [0,1], shift ``6 x hue shift``
    broadcast to (N,1,M), base (1,3,1) ``_HUE_BASE``."""
    r, g, b = x.unbind(1)
    rg = torch.maximum(r, g)
    top = torch.maximum(rg, b).unsqueeze(1)  # (N,1,M)
    delta = top - x.amin(1, keepdim=True)
    arg = torch.where(b > rg, 2, g > r).unsqueeze(1)  # the max channel (a tie gives the same hue)
    rolled = torch.cat([x, x[:, :2]], 1)  # r, g, b, r, g
    diff = rolled[:, 1:4] - rolled[:, 2:5]  # g - b, b - r, r - g: the hue where r, g or b is max
    hue6 = torch.addcdiv(torch.add(shift, arg, alpha=2), diff.gather(1, arg), delta.clamp_min(1e-30))
    k = torch.add(hue6, base).remainder_(6.0)  # 6 x shifted hue + base; grey pixels stay grey
    f = torch.rsub(k, 4.0)
    torch.minimum(k, f, out=f).clamp_(0.0, 1.0)
    return torch.addcmul(top, delta, f, value=-1.0, out=f)


def adjust_colour(x: Tensor, brightness: Tensor | None = None, contrast: Tensor | None = None,
                  saturation: Tensor | None = None, hue: Tensor | None = None) -> Tensor:
    """Per-sample colour jitter with explicit factors, applied in this fixed order.

    x (N,3,H,W) in [0,1]; each factor (N,) or None to skip. Factor 1 (hue 0) leaves a sample
    exactly unchanged. Each op equals torchvision's ``adjust_<op>`` of one float image.
    """
    k = _plan([], [], x.device)
    y = x.flatten(2)  # (N,3,M)
    if brightness is not None:
        y = (y * brightness.view(-1, 1, 1)).clamp_(0.0, 1.0)
    if contrast is not None:
        mean = _luma(y, k.luma).mean(-1, keepdim=True)
        y = torch.lerp(mean, y, contrast.view(-1, 1, 1)).clamp_(0.0, 1.0)
    if saturation is not None:
        y = torch.lerp(_luma(y, k.luma), y, saturation.view(-1, 1, 1)).clamp_(0.0, 1.0)
    if hue is not None:
        shifted = _hue(y, 6.0 * hue.view(-1, 1, 1), k.hue_base.view(1, 3, 1))
        y = torch.lerp(y, shifted, (hue != 0).to(y.dtype).view(-1, 1, 1))
    return y.view_as(x)


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


def _photometric(x: Tensor, u: Tensor, events: Tensor, k: _Plan) -> Tensor:
    """Colour jitter with each column's probability, then grayscale, then blur, for every column
    at once: x (B,3,M) in [0,1] laid out as ``k.groups``; u (B,G,R) uniforms; events (B,G,4)."""
    on = events.to(x.dtype).transpose(1, 2)  # (B,4,G)
    factors = torch.where(events[..., 1:2], torch.addcmul(k.factor_lo, u[..., _FACTORS], k.factor_span),
                          k.no_jitter).transpose(1, 2)  # (B,4,G): b, 1 - c, 1 - s, 6 x hue
    t = k.spread(torch.cat([factors, on[:, 1:3] * k.events_on], 1))  # (B,6,M): + hue on, grey on
    # In place on x (a fresh tensor): lerp_ with weight 0 leaves a value exactly as it is.
    x.mul_(t[:, 0:1]).clamp_(0.0, 1.0)  # brightness
    x.lerp_(k.segment_mean(_luma(x, k.luma)), t[:, 1:2]).clamp_(0.0, 1.0)  # contrast
    x.lerp_(_luma(x, k.luma), t[:, 2:3]).clamp_(0.0, 1.0)  # saturation
    if k.coloured_from is not None:  # hue and grayscale, on the pixels of the columns that have them
        y, t = x[..., k.coloured_from:], t[..., k.coloured_from:]
        if k.any_hue:
            y.lerp_(_hue(y, t[:, 3:4], k.hue_base.view(1, 3, 1)), t[:, 4:5])
        if k.any_gray:
            y.lerp_(_luma(y, k.luma), t[:, 5:6])
    if k.any_blur:
        x = _random_blur(x, u[..., _SIGMA], events[..., 3], k)
    return x


def _random_blur(x: Tensor, u: Tensor, on: Tensor, k: _Plan) -> Tensor:
    """Blur with sigma in [0.1, 2] the columns where ``on``, in place; x (B,3,M), u and on (B,G).
    Each run of equal-size columns is blurred from its first to its last column with blur."""
    b, first = x.shape[0], 0
    sigma = u * 1.9 + 0.1
    for a, n, s in k.groups:
        blurred = [j for j in range(n) if k.columns[first + j].blur]
        if blurred:
            lo, hi = blurred[0], blurred[-1] + 1
            crops = x[..., a + lo * s * s:a + hi * s * s].view(b, 3, hi - lo, s, s)
            flat = crops.transpose(1, 2).reshape(b * (hi - lo), 3, s, s)
            cols = slice(first + lo, first + hi)
            out = gaussian_blur(flat, sigma[:, cols].reshape(-1))
            out = torch.where(on[:, cols].reshape(-1, 1, 1, 1), out, flat)
            crops.copy_(out.view(b, hi - lo, 3, s, s).transpose(1, 2))
        first += n
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


def _views(x: Tensor, columns: Sequence[_Column], size: int, patch_size: int, num_views: int,
           photometric: bool, generator) -> tuple[Tensor, Tensor]:
    """The crops of ``columns`` for a float batch x (B,3,H,W): ``num_views`` crops of the image
    at ``size``, then patches of the last at ``patch_size``, coloured when ``photometric``.
    -> (crops (B,3,M) in [0,1], the views' pixels then the patches', boxes (B,G,4))."""
    b, dev, num_patches = x.shape[0], x.device, len(columns) - num_views
    groups = [(0, num_views, size)]
    if num_patches:
        groups.append((num_views * size * size, num_patches, patch_size))
    k = _plan(columns, groups, dev)
    u = torch.rand(b, k.num, _NUM_RANDOM, generator=generator, device=dev)
    boxes = _sample_boxes(u, k)
    events = u[..., _EVENTS] < k.probs  # (B,G,4): flip, jitter, grayscale, blur
    theta = _theta(boxes, events[..., 0], k)
    views = _crop(x, theta[:, :num_views], size)  # (B,3,V*S,S), geometric only
    crops = views.view(b, 3, -1)
    if num_patches:  # cut from the geometric (uncoloured) last view, the query
        patches = _crop(views[:, :, -size:], theta[:, num_views:], patch_size)
        crops = torch.cat([crops, patches.view(b, 3, -1)], 2)
    if photometric:
        crops = _photometric(crops, u, events, k)
    return crops, boxes


class BatchedViewPatch(_BatchedTransform):
    """Stage-1 views of a batch: query g1, key g2, L patches and their boxes (the paper's views).

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

    def columns(self, height: int, width: int) -> list[_Column]:
        """Key, query, then the L patches (drawn in the S x S query view): the columns with hue
        and grayscale are one run of pixels."""
        s = self.size
        return [_Column((width, height), tuple(self.key_scale), False, 1.0, 0.0, 0.0, False),
                _Column((width, height), tuple(self.query_scale), False, 0.8, 0.1, 0.2, self.blur),
                *[_Column((s, s), tuple(self.patch_scale), True, 0.8, 0.1, 0.2, self.blur)]
                * self.num_patches]

    def forward(self, images: Tensor, generator: torch.Generator | None = None):
        x = to_float(images)  # (B,3,H,W)
        (b, _, h, w), s, p, n = x.shape, self.size, self.patch_size, self.num_patches
        crops, boxes = _views(x, self.columns(h, w), s, p, 2, self.photometric, generator)
        crops = crops.sub_(self.mean.to(x.device).view(1, 3, 1))
        std = self.std.to(x.device)
        query, key = x.new_empty(b, 3, s, s), x.new_empty(b, 3, s, s)
        patches = x.new_empty(b, n, 3, p, p)
        torch.div(crops[..., :s * s].view(b, 3, s, s), std, out=key)  # contiguous outputs
        torch.div(crops[..., s * s:2 * s * s].view(b, 3, s, s), std, out=query)
        if n:
            torch.div(crops[..., 2 * s * s:].view(b, 3, n, p, p).transpose(1, 2), std[:, None],
                      out=patches)
        return query, key, patches, boxes[:, 2:].contiguous()


class BatchedQueryView(_BatchedTransform):
    """The g1 pipeline alone (stage-2 training augmentation): uint8 batch -> (B,3,S,S)."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.2, 1.0), blur: bool = False,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 photometric: bool = True) -> None:
        super().__init__(size, mean, std)
        self.scale, self.blur, self.photometric = scale, blur, photometric

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        x = to_float(images)
        column = _Column((x.shape[3], x.shape[2]), tuple(self.scale), False, 0.8, 0.1, 0.2, self.blur)
        crops, _ = _views(x, [column], self.size, self.size, 1, self.photometric, generator)
        return self.normalise(crops.view(x.shape[0], 3, self.size, self.size))


def _random_crop_flip(x: Tensor, size: int, scale, generator) -> Tensor:
    """RandomResizedCrop + horizontal flip, (B,3,H,W) -> (B,3,S,S)."""
    column = _Column((x.shape[3], x.shape[2]), tuple(scale))
    crops, _ = _views(x, [column], size, size, 1, False, generator)
    return crops.view(x.shape[0], 3, size, size)


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
