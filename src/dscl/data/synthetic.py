"""A small generated long-tailed image data set: the project's default data, no download.

Why this design: patch-based self distillation (PBSD) helps when tail classes are made of the
same local parts as head classes, in a different combination. So every class here is 2-4 parts
taken from one SHARED BANK of local visual parts (stripes at four orientations, checkers,
rings, blobs, crosses, diamonds, each with its own two colours), placed at class-specific slots
of a 3 x 3 grid on a noisy background. Each part occurs in several classes and every tail class
shares a part with a head class, so no single part names a class: the combination (and its
layout) does. Per image the parts' positions, sizes, angles and colours jitter, the background
tint, gradient and noise vary, and most images carry one or two distractor parts.

The class design (which parts where) is fixed for a given ``num_classes``; ``seed`` changes the
images. Each split and class draws from its own ``numpy`` generator keyed by (seed, split,
class), so splits are independent and the result is byte-identical from run to run.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from dscl.data.longtail import longtail_counts
from dscl.errors import DataError

SPLITS = ("train", "val", "test")
_DESIGN_SEED = 20240101
_KINDS = ("stripes", "stripes", "stripes", "stripes", "checker", "ring", "blob", "cross", "diamond")
_STRIPE_ANGLES = (0.0, 45.0, 90.0, 135.0)
_PALETTE = np.array([
    [220, 40, 40], [40, 180, 60], [50, 80, 220], [235, 200, 40], [200, 60, 200],
    [40, 200, 210], [245, 130, 30], [120, 70, 30], [240, 240, 240], [25, 25, 25],
], dtype=np.float64)
_SLOTS = (0.22, 0.5, 0.78)  # grid line positions, fraction of the image side
_RADIUS = 0.15  # part radius, fraction of the image side


Part = tuple[str, float, int, int]  # kind, angle in degrees, palette index of colours a, b


def _design(num_classes: int) -> tuple[list[Part], list[list[tuple[int, int]]]]:
    """The part bank [(kind, angle, colour a, colour b)] and per class [(part, slot)]."""
    rng = np.random.default_rng([_DESIGN_SEED, num_classes])
    n_parts = min(18, max(6, num_classes // 2 + 3))
    bank = []
    for b in range(n_parts):
        k = b % len(_KINDS)
        angle = _STRIPE_ANGLES[k] if _KINDS[k] == "stripes" else 0.0
        a, c = rng.choice(len(_PALETTE), 2, replace=False)
        bank.append((_KINDS[k], angle, int(a), int(c)))
    # Best of a few draws: prefer a design where every part used occurs in >= 2 classes.
    best, best_unique = None, None
    for _ in range(200):
        classes = _draw_classes(rng, num_classes, n_parts)
        uses = np.bincount([p for cls in classes for p, _ in cls], minlength=n_parts)
        unique = int((uses == 1).sum())
        if best is None or unique < best_unique:
            best, best_unique = classes, unique
        if unique == 0:
            break
    classes = best
    return bank, classes


def _draw_classes(rng: np.random.Generator, num_classes: int, n_parts: int) -> list:
    """Per class 2-4 distinct (part, slot) pairs; layouts unique; tail shares with head."""
    head = max(1, num_classes // 2)
    classes: list[list[tuple[int, int]]] = []
    seen: set[frozenset] = set()
    while len(classes) < num_classes:
        k = int(rng.integers(2, 5))
        parts = rng.choice(n_parts, k, replace=False).tolist()
        slots = rng.choice(9, k, replace=False).tolist()
        layout = frozenset(zip(parts, slots))
        if layout in seen:
            continue
        if len(classes) >= head:  # tail class: must share a part with a head class
            head_parts = {p for cls in classes[:head] for p, _ in cls}
            if not head_parts.intersection(parts):
                continue
        seen.add(layout)
        classes.append(sorted(layout))
    return classes


def _render(img: np.ndarray, part: Part, cx, cy, scale, angle, rng) -> None:
    """Composite one part onto ``img`` (n,H,W,3) float, in place; cx, cy, scale, angle are (n,)."""
    n, h, w, _ = img.shape
    kind, base_angle, ca, cb = part
    ys, xs = np.mgrid[0:h, 0:w] + 0.5  # pixel centres, (H,W)
    radius = _RADIUS * w * scale[:, None, None]  # (n,1,1)
    dx = (xs[None] - cx[:, None, None]) / radius  # (n,H,W), part units
    dy = (ys[None] - cy[:, None, None]) / radius
    th = np.deg2rad(base_angle + angle)[:, None, None]
    u = np.cos(th) * dx + np.sin(th) * dy
    v = -np.sin(th) * dx + np.cos(th) * dy
    r, box = np.hypot(u, v), np.maximum(np.abs(u), np.abs(v))

    def soft(d):  # 1 inside d < 1, fading out over 0.12 part radii
        return np.clip((1.0 - d) / 0.12, 0.0, 1.0)

    if kind == "stripes":
        alpha, t = soft(box), (np.sin(3.0 * np.pi * u) > 0).astype(np.float64)
    elif kind == "checker":
        alpha, t = soft(box), (np.floor(2 * u + 2) + np.floor(2 * v + 2)) % 2
    elif kind == "ring":
        alpha, t = np.clip((0.3 - np.abs(r - 0.65)) / 0.1, 0, 1), np.ones_like(r)
    elif kind == "blob":
        alpha, t = soft(r), np.clip(1.2 - r, 0, 1)
    elif kind == "cross":
        alpha = soft(box) * np.clip((0.32 - np.minimum(np.abs(u), np.abs(v))) / 0.1, 0, 1)
        t = np.ones_like(r)
    else:  # diamond
        alpha, t = soft(np.abs(u) + np.abs(v)), (np.abs(u) + np.abs(v) < 0.5).astype(np.float64)
    gain = rng.uniform(0.8, 1.2, (n, 1, 1, 1))  # colour jitter
    shift = rng.normal(0.0, 12.0, (n, 1, 1, 3))
    col_a = _PALETTE[ca] * gain + shift
    col_b = _PALETTE[cb] * gain + shift
    colour = t[..., None] * col_a + (1.0 - t[..., None]) * col_b  # (n,H,W,3)
    alpha = alpha[..., None]
    img *= 1.0 - alpha
    img += alpha * colour


def _generate(bank, layout, n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` images (n,size,size,3) uint8 of the class with ``layout`` [(part, slot)]."""
    ys, xs = np.mgrid[0:size, 0:size] / size - 0.5  # (H,W) in [-0.5, 0.5)
    base = rng.uniform(60, 190, (n, 1, 1, 1)) + rng.normal(0, 15, (n, 1, 1, 3))
    grad = rng.normal(0, 30, (n, 2, 1, 1, 1))
    img = base + grad[:, 0] * xs[None, :, :, None] + grad[:, 1] * ys[None, :, :, None]
    img = img + rng.normal(0, 18, img.shape)  # (n,H,W,3) background

    for _ in range(2):  # 0, 1 or 2 distractor parts anywhere, under the class's parts
        distract = rng.random(n) < 0.5
        which = rng.integers(0, len(bank), n)
        for p in np.unique(which[distract]):
            sel = distract & (which == p)
            m = int(sel.sum())
            sub = img[sel]
            pos = rng.uniform(0.15, 0.85, (2, m)) * size
            _render(sub, bank[p], pos[0], pos[1], rng.uniform(0.65, 0.9, m),
                    rng.uniform(-180, 180, m), rng)
            img[sel] = sub
    for part, slot in layout:
        cx = (_SLOTS[slot % 3] + rng.normal(0, 0.05, n)) * size
        cy = (_SLOTS[slot // 3] + rng.normal(0, 0.05, n)) * size
        _render(img, bank[part], cx, cy, rng.uniform(0.85, 1.15, n), rng.normal(0, 10, n), rng)
    img += rng.normal(0, 10, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


class SyntheticLongTailed:
    """Generated long-tailed data: ``(PIL RGB image, label)`` items, images in ``data``.

    ``train`` follows ``longtail_counts(n_max, num_classes, imbalance_ratio, profile)``; ``val`` has
    ``n_per_class_eval // 2`` and ``test`` ``n_per_class_eval`` images per class. Items are
    ordered class by class. The default (10 classes, 500 to 5 training images) is about 2,700
    32-px images in all, generated in a second or two.
    """

    def __init__(
        self,
        split: str,
        num_classes: int = 10,
        n_max: int = 500,
        imbalance_ratio: float = 100.0,
        n_per_class_eval: int = 100,
        image_size: int = 32,
        seed: int = 0,
        profile: str = "exponential",
    ) -> None:
        if split not in SPLITS:
            raise DataError(f"synthetic: unknown split {split!r}; known: {', '.join(SPLITS)}")
        if num_classes < 2:
            raise DataError(f"synthetic: num_classes must be >= 2, got {num_classes}")
        if image_size < 8:
            raise DataError(f"synthetic: image_size must be >= 8, got {image_size}")
        if n_max < 1 or n_per_class_eval < 2:
            raise DataError(f"synthetic: need n_max >= 1 and n_per_class_eval >= 2, "
                            f"got {n_max}, {n_per_class_eval}")
        if not imbalance_ratio >= 1:
            raise DataError(f"synthetic: imbalance_ratio must be >= 1, got {imbalance_ratio}")
        if split == "train":
            counts = longtail_counts(n_max, num_classes, imbalance_ratio, profile)
        else:
            per_class = n_per_class_eval // 2 if split == "val" else n_per_class_eval
            counts = [per_class] * num_classes
        bank, layouts = _design(num_classes)
        chunks = []
        for c, n_c in enumerate(counts):
            rng = np.random.default_rng([seed, SPLITS.index(split), c])
            chunks.append(_generate(bank, layouts[c], n_c, image_size, rng))
        self.split = split
        self.data = np.concatenate(chunks)  # (N,H,W,3) uint8
        self.targets = [c for c, n_c in enumerate(counts) for _ in range(n_c)]
        self.classes = [
            f"{c:02d}-" + "+".join(bank[p][0] for p, _ in layouts[c]) for c in range(num_classes)
        ]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.data[index]), self.targets[index]
