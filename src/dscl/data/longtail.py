"""Long-tailed subsets of balanced data sets, and the Many / Medium / Few class groups.

The construction is the one every CIFAR-LT number in the literature uses (LDAM-DRW, Cao et al.
2019): class ``c`` of ``C`` keeps ``n_c = int(n_max * (1/rho) ** (c / (C - 1)))`` images (the
exponential profile; the Pareto profile of the paper's supplement keeps
``n_c = int(n_max * (c + 1) ** -(log rho / log C))``, a power law with the same head and tail), chosen
by seeding numpy's legacy generator, then, class by class in label order, shuffling that class's
indices (in file order) and keeping the first ``n_c``. Reproducing the random stream exactly is
what makes "CIFAR-10-LT at rho=100" the same 12,406 images here as in published work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Class groups by number of TRAINING images (the paper's Many / Medium / Few).
MANY_SHOT_MIN = 101  # "many": more than 100
FEW_SHOT_MAX = 19  # "few": fewer than 20


PROFILES = ("exponential", "pareto")


def longtail_counts(n_max: int, num_classes: int, imbalance_ratio: float, profile: str = "exponential") -> list[int]:
    """Images kept per class, head (class 0) first.

    ``imbalance_ratio`` (rho) is ``n_max / n_min``; rho = 1 keeps ``n_max`` for every class.
    ``exponential``: ``n_max * rho ** (-c / (C - 1))`` (LDAM-DRW). ``pareto``: the sorted class
    sizes of a Pareto (power-law) distribution, ``n_max * (c + 1) ** (-log rho / log C)``: a
    steeper drop after the head and a longer flat tail than the exponential profile.
    """
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {', '.join(PROFILES)}, got {profile!r}")
    if n_max < 1:
        raise ValueError(f"n_max must be >= 1, got {n_max}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not imbalance_ratio >= 1.0:
        raise ValueError(f"imbalance_ratio must be >= 1, got {imbalance_ratio}")
    if num_classes == 1:
        return [int(n_max)]
    if profile == "pareto":
        exponent = math.log(imbalance_ratio) / math.log(num_classes)
        return [int(n_max * (c + 1.0) ** -exponent + 1e-9) for c in range(num_classes)]
    factor = 1.0 / imbalance_ratio
    return [int(n_max * factor ** (c / (num_classes - 1.0))) for c in range(num_classes)]


def longtail_indices(
    targets: Sequence[int],
    counts: Sequence[int],
    seed: int = 0,
    shuffle: bool = True,
) -> list[int]:
    """Indices into ``targets`` of the long-tailed subset, concatenated class by class.

    ``counts[c]`` images are kept for class ``c`` (all of them when the class has fewer).
    With ``shuffle=True`` each class's indices, in their order in ``targets``, are shuffled by
    one ``numpy.random.RandomState(seed)`` shared across classes in label order, which is the
    same stream as ``np.random.seed(seed)`` followed by ``np.random.shuffle`` per class (LDAM).
    With ``shuffle=False`` the first ``counts[c]`` in file order are kept.
    """
    labels = np.asarray(targets, dtype=np.int64)  # (N,)
    if labels.ndim != 1:
        raise ValueError(f"targets must be one-dimensional, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(counts)):
        raise ValueError(
            f"targets must lie in [0, {len(counts)}) (one count per class), "
            f"got labels from {labels.min()} to {labels.max()}"
        )
    rng = np.random.RandomState(seed)
    kept: list[int] = []
    for c, n_c in enumerate(counts):
        if n_c < 0:
            raise ValueError(f"counts[{c}] must be >= 0, got {n_c}")
        idx = np.where(labels == c)[0]  # file order
        if shuffle:
            rng.shuffle(idx)
        kept.extend(int(i) for i in idx[:n_c])
    return kept


def holdout_indices(
    targets: Sequence[int],
    kept: Sequence[int],
    val_per_class: int,
    seed: int = 0,
) -> tuple[list[int], list[int]]:
    """Split a balanced validation set off a long-tailed selection.

    For each class, ``val_per_class`` indices are drawn (by ``RandomState(seed)``, classes in
    label order) from the class's indices that are NOT in ``kept``, i.e. the images the
    long-tailed subset left out, so the training subset stays the standard one. A class with
    too few left-out images (the head class keeps all of its images) takes the shortfall at
    random from its kept images, which then leave the training subset. Returns
    ``(kept without those, validation indices)``, the latter class by class.
    """
    if val_per_class < 0:
        raise ValueError(f"val_per_class must be >= 0, got {val_per_class}")
    labels = np.asarray(targets, dtype=np.int64)
    kept_arr = np.asarray(kept, dtype=np.int64)
    in_kept = np.zeros(len(labels), dtype=bool)
    in_kept[kept_arr] = True
    rng = np.random.RandomState(seed)
    val: list[int] = []
    moved: set[int] = set()
    for c in range(int(labels.max()) + 1 if labels.size else 0):
        left = np.where((labels == c) & ~in_kept)[0]
        rng.shuffle(left)
        take = left[:val_per_class].tolist()
        if len(take) < val_per_class:
            own = kept_arr[labels[kept_arr] == c]
            short = val_per_class - len(take)
            if len(own) <= short:
                raise ValueError(
                    f"class {c} has {len(left) + len(own)} images, too few for "
                    f"{val_per_class} validation images and at least one training image"
                )
            extra = own[rng.permutation(len(own))[:short]].tolist()
            moved.update(extra)
            take.extend(extra)
        val.extend(int(i) for i in take)
    return [int(i) for i in kept if int(i) not in moved], val


def shot_groups(train_counts: Sequence[int]) -> list[str]:
    """Per class: 'many' (> 100 training images), 'medium' (20 to 100), 'few' (< 20)."""
    groups = []
    for n in train_counts:
        if n >= MANY_SHOT_MIN:
            groups.append("many")
        elif n <= FEW_SHOT_MAX:
            groups.append("few")
        else:
            groups.append("medium")
    return groups
