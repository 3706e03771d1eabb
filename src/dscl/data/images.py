"""Image-backed data sets: a list of files on disk, or an in-memory uint8 array.

Both return ``(PIL RGB image, int label)`` and carry ``targets`` and ``classes``, which is all
the rest of the package relies on. A file that PIL cannot decode (corrupt, truncated) raises
:class:`DataError` naming the file rather than a PIL traceback from deep in a worker.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from dscl.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm")


def is_image_file(name: str) -> bool:
    """True for the extensions this package reads, in any letter case."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def load_rgb(path: str) -> Image.Image:
    """Open and fully decode ``path`` as RGB; any decoding failure becomes a DataError."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # convert() decodes every pixel
    except FileNotFoundError as exc:
        raise DataError(f"image file not found: {path}") from exc
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc


def _is_bad(path: str) -> bool:
    try:
        load_rgb(path)
    except DataError:
        return True
    return False


def find_bad_images(paths: Iterable[str], workers: int | None = None) -> list[str]:
    """The paths among ``paths`` that cannot be opened and decoded, in input order.

    Decoding releases the GIL, so a few threads make this a lot faster on large lists.
    """
    paths = list(paths)
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        bad = list(pool.map(_is_bad, paths, chunksize=64))
    return [p for p, b in zip(paths, bad) if b]


class ImageListDataset(Dataset):
    """Images read from ``paths`` on access, with integer labels ``targets``."""

    def __init__(self, paths: Sequence[str], targets: Sequence[int], classes: Sequence[str]):
        if len(paths) != len(targets):
            raise ValueError(f"{len(paths)} paths but {len(targets)} targets")
        self.paths = list(paths)
        self.targets = [int(t) for t in targets]
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return load_rgb(self.paths[index]), self.targets[index]

    def subset(self, indices: Sequence[int]) -> ImageListDataset:
        """A new data set holding the items at ``indices``, in that order."""
        return ImageListDataset([self.paths[i] for i in indices],
                                [self.targets[i] for i in indices], self.classes)

    def without(self, bad_paths: Iterable[str]) -> ImageListDataset:
        """A new data set without the items whose path is in ``bad_paths``."""
        bad = set(bad_paths)
        return self.subset([i for i, p in enumerate(self.paths) if p not in bad])


class ArrayDataset(Dataset):
    """Images held in memory: ``data`` (N,H,W,3) uint8, as torchvision's CIFAR keeps them."""

    def __init__(self, data: np.ndarray, targets: Sequence[int], classes: Sequence[str]):
        data = np.asarray(data)
        if data.ndim != 4 or data.shape[-1] != 3 or data.dtype != np.uint8:
            raise ValueError(f"data must be (N,H,W,3) uint8, got {data.shape} {data.dtype}")
        if len(data) != len(targets):
            raise ValueError(f"{len(data)} images but {len(targets)} targets")
        self.data = data
        self.targets = [int(t) for t in targets]
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.data[index]), self.targets[index]

    def subset(self, indices: Sequence[int]) -> ArrayDataset:
        """A new data set holding the items at ``indices``, in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        return ArrayDataset(self.data[idx], [self.targets[i] for i in idx], self.classes)
