"""Fake image-folder trees for the data-set tests: many files, made in seconds."""

import os
from pathlib import Path

from PIL import Image


def linked_images(folder: Path, image: Image.Image, count: int) -> None:
    """``count`` files ``<folder name>_NNNNN.JPEG`` in ``folder``, all hard links to ``image``
    saved once: a fake data set of 100,000 files in seconds (one source per folder, since the
    links to one file are limited)."""
    folder.mkdir(parents=True)
    source = folder.parent / f".{folder.name}.JPEG"
    image.save(source)
    for i in range(count):
        os.link(source, folder / f"{folder.name}_{i:05d}.JPEG")
    source.unlink()
