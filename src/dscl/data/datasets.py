"""Train / validation / test splits of every supported data set, behind one call.

Every data set returns ``(PIL RGB image, int label)`` and has ``targets`` and ``classes``
(in-memory ones also ``data``, (N,H,W,3) uint8). :func:`build_splits` reads a data set by name,
applies its standard long-tailed construction (LDAM-DRW's for CIFAR-LT) and checks it, so that the
engine never sees a malformed split.
"""

from __future__ import annotations

import os
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from dscl.data.images import ArrayDataset, ImageListDataset, find_bad_images, is_image_file, load_rgb
from dscl.data.longtail import holdout_indices, longtail_counts, longtail_indices
from dscl.data.readers import (read_coco_json, read_image_folder, read_split_json,
                               read_split_text)
from dscl.data.synthetic import SyntheticLongTailed
from dscl.errors import DataError

DATASET_NAMES = ("synthetic", "cifar10-lt", "cifar100-lt", "imagefolder", "imagenet-lt",
                 "places-lt", "inat2018")
_SPLIT_FILES = {"imagenet-lt": ("ImageNet_LT", 1000), "places-lt": ("Places_LT", 365)}
_SYNTHETIC_KEYS = ("num_classes", "n_max", "n_per_class_eval", "image_size")
_DEFAULT_RATIO = 100.0
HOLDOUT_SEED = 0  # the held-out validation images are the same whatever the run's seed


def default_ratio(name: str) -> float | None:
    """The imbalance ratio data set ``name`` takes when none is given: CIFAR-LT's and the
    synthetic set's 100; None (every image) for image folders and the split-file data sets."""
    return _DEFAULT_RATIO if name in ("synthetic", "cifar10-lt", "cifar100-lt") else None


class TransformedDataset(Dataset):
    """``dataset`` with ``transform`` applied to each image: ``(transform(img), label)``."""

    def __init__(self, dataset: Dataset, transform: Callable[[Image.Image], Any]) -> None:
        self.dataset = dataset
        self.transform = transform
        self.targets: list[int] = dataset.targets
        self.classes: list[str] = dataset.classes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img, label = self.dataset[index]
        return self.transform(img), label


@dataclass
class DataSplits:
    """The splits of one data set; ``val`` is None where the data set has none."""

    train: Dataset
    val: Dataset | None
    test: Dataset
    num_classes: int
    classes: list[str]
    image_size: int  # native / target side: 32 for synthetic and CIFAR, 224 for photographs
    bad_files: list[str] = field(default_factory=list)
    # how the training (and validation) images were chosen, in words, for the run's log
    selection: str = ""

    @property
    def train_counts(self) -> list[int]:
        """Training images per class, the basis of the Many / Medium / Few groups."""
        return np.bincount(self.train.targets, minlength=self.num_classes).tolist()

    @property
    def signature(self) -> dict:
        """What tells this data set apart wherever it lies: its classes and training images per class."""
        return {"classes": list(self.classes), "train_counts": self.train_counts}


def _synthetic(ratio: float, seed: int, options: dict | None, profile: str) -> DataSplits:
    options = dict(options or {})
    unknown = sorted(set(options) - set(_SYNTHETIC_KEYS))
    if unknown:
        raise DataError(f"synthetic: unknown option(s) {unknown}; known: {list(_SYNTHETIC_KEYS)}")
    splits = {s: SyntheticLongTailed(s, imbalance_ratio=ratio, seed=seed, profile=profile, **options)
              for s in ("train", "val", "test")}
    train = splits["train"]
    return DataSplits(train, splits["val"], splits["test"], len(train.classes), train.classes,
                      train.data.shape[1])


def _select(targets: list[int], classes: list[str], ratio: float | None, val_per_class: int, profile: str,
            where: str, default: bool) -> tuple[list[int], list[int] | None, str]:
    """The long-tailed subset (``ratio`` None: every image) and the validation hold-out
    (``val_per_class`` > 0) of a training split: ``(kept, validation or None, what was done)``.
    A class left without a training image raises a DataError that names what removed them.
    ``default``: the ratio is the data set's default, not one the config gave."""
    num_classes = len(classes)
    sizes = np.bincount(targets, minlength=num_classes)
    kept = list(range(len(targets)))
    setting = "the default of this data set" if default else "data.imbalance_ratio"
    if ratio is None:
        what = f"no long-tailed subset (data.imbalance_ratio not set): all {len(kept)} training images"
    else:
        counts = longtail_counts(int(sizes.max()), num_classes, ratio, profile)
        for c in range(num_classes):
            if min(counts[c], sizes[c]) == 0:
                hint = ("set data.imbalance_ratio: null to keep every file, or a lower ratio"
                        if not default else "set a lower data.imbalance_ratio")
                raise DataError(f"{where}: class {c} ({classes[c]}) has no training image left: the long-tailed "
                                f"subset at ratio {ratio:g} ({setting}, {profile} profile) keeps {counts[c]} of its "
                                f"{sizes[c]} images; {hint}")
        kept = longtail_indices(targets, counts, seed=0)
        what = f"long-tailed subset at ratio {ratio:g} ({setting}): kept {len(kept)} of {len(targets)} training images"
    if val_per_class <= 0:
        return kept, None, what
    for c in range(num_classes):
        if sizes[c] <= val_per_class:
            raise DataError(f"{where}: class {c} ({classes[c]}) would have no training image left: it has "
                            f"{sizes[c]} images and data.val_per_class holds out {val_per_class} per class for "
                            f"validation; set a lower data.val_per_class")
    before = len(kept)
    kept, val = holdout_indices(targets, kept, val_per_class, HOLDOUT_SEED)
    moved = before - len(kept)
    source = (f", {moved} of them from the kept images of the classes with too few left over" if moved
              and ratio is not None else "")
    return kept, val, f"{what}; {val_per_class} per class held out for validation (data.val_per_class{source})"


def _cifar(name: str, root: str, ratio: float, default: bool, val_per_class: int, download: bool,
           profile: str) -> DataSplits:
    from torchvision import datasets as tv_datasets  # looked up here: tests substitute it

    cls = tv_datasets.CIFAR10 if name == "cifar10-lt" else tv_datasets.CIFAR100
    try:
        full = cls(root, train=True, download=download)
        test = cls(root, train=False, download=download)
    except (RuntimeError, OSError) as exc:
        hint = "" if download else "; set `data.download: true` to download it"
        raise DataError(f"{name}: CIFAR files not found or corrupted under {root}{hint} "
                        f"({exc})") from None
    classes = list(full.classes)
    train_all = ArrayDataset(np.asarray(full.data), full.targets, classes)
    # the LDAM-DRW images, then the balanced hold-out from those it left out
    kept, val_idx, what = _select(train_all.targets, classes, ratio, val_per_class, profile, name, default)
    val = None if val_idx is None else train_all.subset(val_idx)
    return DataSplits(train_all.subset(kept), val,
                      ArrayDataset(np.asarray(test.data), test.targets, classes),
                      len(classes), classes, 32, selection=what)


def _native_size(path: str) -> int:
    """Side of small square images (<= 64 px, e.g. CIFAR as JPEG), else 224 (also when unreadable:
    build_splits raises or drops the image later)."""
    return _square_side(path) or 224


def _square_side(path) -> int | None:
    try:
        with Image.open(path) as img:
            w, h = img.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return w if w == h and w <= 64 else 224


def folder_image_size(root: str | None) -> int | None:
    """The side an image folder's run uses (:func:`_native_size` of its first readable training
    image), or None when ``root/train`` holds none, for a run folder that did not record it."""
    train = Path(root or "") / "train"
    files = sorted(p for p in train.rglob("*") if is_image_file(p.name)) if root and train.is_dir() else []
    return next((side for side in map(_square_side, files) if side is not None), None)


def _imagefolder(root: str, ratio: float | None, val_per_class: int, profile: str,
                 test_folder: str = "test") -> DataSplits:
    listing, classes = read_image_folder(root, test_folder)
    sets = {s: ImageListDataset(*listing[s], classes) for s in listing}
    train = sets["train"]
    val = sets.get("val")
    hold_out = val_per_class if val is None else 0  # a val/ folder is the validation split
    kept, val_idx, what = _select(train.targets, classes, ratio, hold_out, profile,
                                  f"image folder {os.path.join(root, 'train')}", False)
    if val is not None:
        what += f"; validation: the {os.path.join(root, 'val')} folder"
    elif val_idx is not None:
        val = train.subset(val_idx)
    else:
        what += "; no validation split (no val folder, data.val_per_class 0)"
    what += f"; test: the {os.path.join(root, test_folder)} folder"
    return DataSplits(train.subset(kept), val, sets["test"], len(classes), classes,
                      _native_size(train.paths[0]), selection=what)


def _split_file(prefix: str, root: str, split: str, num_classes: int, required: bool):
    """Read ``{prefix}_{split}.txt`` (or, failing that, ``.json``) under root."""
    txt = os.path.join(root, f"{prefix}_{split}.txt")
    js = os.path.join(root, f"{prefix}_{split}.json")
    if os.path.isfile(txt):
        path, listing = txt, read_split_text(txt, root, num_classes)
    elif os.path.isfile(js):
        path, listing = js, read_split_json(js, root, num_classes)
    elif required:
        raise DataError(f"split file not found: {txt} (or {os.path.basename(js)})")
    else:
        return None, None
    if not listing[0]:
        raise DataError(f"{path}: no entries, the {split} split would be empty")
    return path, listing


def _class_names(paths: list[str], labels: list[int], num_classes: int) -> list[str]:
    """Each class's name from the folder of its first image, when those names are unique."""
    first: dict[int, str] = {}
    for p, y in zip(paths, labels):
        first.setdefault(y, os.path.basename(os.path.dirname(p)))
    names = [first.get(c, str(c)) for c in range(num_classes)]
    return names if len(set(names)) == num_classes else [str(c) for c in range(num_classes)]


def _split_lists(name: str, root: str) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """ImageNet-LT / Places-LT / iNat2018: ({split: listing or None}, {split: file}, classes)."""
    if name == "inat2018":
        train_file = os.path.join(root, "train2018.json")
        test_file = os.path.join(root, "val2018.json")
        for f in (train_file, test_file):
            if not os.path.isfile(f):
                raise DataError(f"inat2018: annotation file not found: {f}")
        train, cat_ids, classes = read_coco_json(train_file, root)
        test, _, _ = read_coco_json(test_file, root, cat_ids)
        for f, listing in ((train_file, train), (test_file, test)):
            if not listing[0]:
                raise DataError(f"{f}: no annotated image, the split would be empty")
        return ({"train": train, "val": None, "test": test},
                {"train": train_file, "val": train_file, "test": test_file}, classes)
    prefix, num_classes = _SPLIT_FILES[name]
    train_file, train = _split_file(prefix, root, "train", num_classes, True)
    val_file, val = _split_file(prefix, root, "val", num_classes, False)
    test_file, test = _split_file(prefix, root, "test", num_classes, True)
    return ({"train": train, "val": val, "test": test},
            {"train": train_file, "val": val_file or train_file, "test": test_file},
            _class_names(*train, num_classes))


def _check(splits: DataSplits, where: str | dict[str, str], note: str = "") -> DataSplits:
    """Refuse empty splits and classes without a training image; ``where`` names the source,
    one for all splits or one per split (the file or folder each split was read from)."""
    source = where if isinstance(where, dict) else dict.fromkeys(("train", "val", "test"), where)
    for split in ("train", "val", "test"):
        ds = getattr(splits, split)
        if ds is not None and len(ds) == 0:
            raise DataError(f"{source[split]}: the {split} split is empty{note}")
    for c, n in enumerate(splits.train_counts):
        if n == 0:
            raise DataError(f"{source['train']}: class {c} ({splits.classes[c]}) has no training "
                            f"image{note}")
    return splits


def _drop_bad(splits: DataSplits) -> DataSplits:
    """Decode every image of every split once; drop and list those that fail."""
    lists = [ds for ds in (splits.train, splits.val, splits.test)
             if isinstance(ds, ImageListDataset)]
    bad = find_bad_images(dict.fromkeys(p for ds in lists for p in ds.paths))
    if bad:
        for split in ("train", "val", "test"):
            ds = getattr(splits, split)
            if isinstance(ds, ImageListDataset):
                setattr(splits, split, ds.without(bad))
        splits.bad_files = bad
    return splits


def _check_eval_images(splits: DataSplits, where: dict[str, str]) -> None:
    """Decode the validation and test images once, before any training: a corrupt test image
    must not surface only after hours of training. Training images are read as they come."""
    for split in ("val", "test"):
        ds = getattr(splits, split)
        if not isinstance(ds, ImageListDataset):
            continue
        bad = find_bad_images(dict.fromkeys(ds.paths))
        if bad:
            try:
                load_rgb(bad[0])
                reason = ""
            except DataError as exc:
                reason = f": {exc}"
            raise DataError(f"{where[split]}: {len(bad)} unreadable image(s) in the {split} split, first {bad[0]}"
                            f"{reason}; replace them, or set data.skip_bad_images: true to drop them")


def build_splits(
    name: str,
    root: str | None = None,
    *,
    imbalance_ratio: float | None = None,
    val_per_class: int = 0,
    download: bool = False,
    seed: int = 0,
    skip_bad_images: bool = False,
    synthetic_options: dict | None = None,
    profile: str = "exponential",
    test_folder: str = "test",
) -> DataSplits:
    """Read data set ``name`` (one of :data:`DATASET_NAMES`) and return its checked splits.

    - ``synthetic``: :class:`SyntheticLongTailed` (rho default 100; ``synthetic_options`` may
      set num_classes, n_max, n_per_class_eval, image_size); has its own val split.
    - ``cifar10-lt`` / ``cifar100-lt``: torchvision's CIFAR files under ``root`` (rho default
      100), LDAM-DRW subset; balanced test. With ``val_per_class > 0`` a balanced validation
      set is drawn (with a fixed seed, so every run seed sees the same split) from the training
      images the LT subset left out; the head class, which keeps all its images, gives up that
      many of them instead.
    - ``imagefolder``: ``root/{train,val,test}/<class>/<image>`` (val optional; the test
      split is read from ``root/<test_folder>``, and with ``test_folder="val"`` the val folder
      is the test split, not the validation split). Every training file is kept unless
      ``imbalance_ratio`` is given: then the train split is subsampled like CIFAR-LT, files in
      sorted order (the CIFAR-10 JPEG folder at rho=100 gives CIFAR-10-LT's 12,406 images).
      Without a validation folder, ``val_per_class > 0`` holds out a validation set as for CIFAR.
    - ``imagenet-lt`` / ``places-lt``: ``ImageNet_LT_{train,val,test}.txt`` /
      ``Places_LT_*.txt`` directly under ``root``, lines ``relative/path label`` (paths
      relative to root); or, where no .txt exists, ``*.json`` holding a list of
      ``{"path": ..., "label": ...}``. Val optional; 1000 / 365 classes.
    - ``inat2018``: COCO-style ``train2018.json`` and ``val2018.json`` under root (val is the
      test split; classes from the train file's ``categories``).

    ``profile`` (``exponential`` or ``pareto``, see :func:`longtail_counts`) shapes the
    subsampled training split of the first three. ``val_per_class`` is ignored where the data
    set has its own validation split. Every image
    file is checked to exist; with ``skip_bad_images`` every image is also decoded once and the
    unreadable ones are dropped and listed in ``bad_files`` (otherwise loading one raises).
    ``selection`` of the result says in words how the training and validation images were chosen.
    A class left without a training image raises a DataError naming what removed its images.
    """
    if name not in DATASET_NAMES:
        raise DataError(f"unknown data set {name!r}; known: {', '.join(DATASET_NAMES)}")
    if name != "synthetic" and not root:
        raise DataError(f"{name}: a root folder is required")
    if name != "synthetic" and not os.path.isdir(root):
        if not (name.startswith("cifar") and download):
            raise DataError(f"{name}: root folder not found: {root}"
                            + ("; set `data.download: true` to download CIFAR"
                               if name.startswith("cifar") else ""))
    default = imbalance_ratio is None  # the data set's own: 100, or every image (default_ratio)
    ratio = default_ratio(name) if default else float(imbalance_ratio)
    if name == "synthetic":
        splits = _synthetic(ratio, seed, synthetic_options, profile)
        splits.selection = (f"synthetic long tail at ratio {ratio:g} "
                            f"({'the default of this data set' if default else 'data.imbalance_ratio'})")
        return _check(splits, name, f" (the synthetic long tail at ratio {ratio:g})")
    if name in ("cifar10-lt", "cifar100-lt"):
        return _check(_cifar(name, root, ratio, default, val_per_class, download, profile), name)
    if name == "imagefolder":
        splits = _imagefolder(root, ratio, val_per_class, profile, test_folder)
        where = {s: os.path.join(root, s) for s in ("train", "val")}
        where["test"] = os.path.join(root, test_folder)
        if test_folder == "val" or not os.path.isdir(where["val"]):
            where["val"] = where["train"]  # held out from the training images
    else:
        lists, where, classes = _split_lists(name, root)  # where: each split's file
        sets = {s: None if v is None else ImageListDataset(*v, classes) for s, v in lists.items()}
        splits = DataSplits(sets["train"], sets["val"], sets["test"], len(classes), classes, 224)
        ignored = "" if ratio is None else f" (data.imbalance_ratio {ratio:g} not used: the lists are the split)"
        held = f"; validation: {where['val']}" if splits.val is not None else "; no validation split"
        splits.selection = f"every image listed in {where['train']}{ignored}{held}"
    _check(splits, where)
    if not skip_bad_images:
        _check_eval_images(splits, where)
    if skip_bad_images:
        splits = _drop_bad(splits)
        _check(splits, where, f" after dropping {len(splits.bad_files)} unreadable image(s)")
        if splits.bad_files:
            splits.selection += f"; {len(splits.bad_files)} unreadable image(s) dropped (data.skip_bad_images)"
        if name == "imagefolder" and splits.bad_files:  # the size came from the first file
            splits.image_size = _native_size(splits.train.paths[0])
    return splits
