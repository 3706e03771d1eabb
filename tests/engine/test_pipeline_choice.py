"""`data.pipeline: auto` chooses the data path by image size, and says so in log.txt."""

import numpy as np
import pytest
from PIL import Image

from dscl.cli import main
from dscl.config import load_config
from dscl.data.images import ImageListDataset
from dscl.engine.loaders import pipeline_choice


def image_list(tmp_path, sizes):
    paths = []
    for n, size in enumerate(sizes):
        path = tmp_path / f"{n}.png"
        Image.fromarray(np.full((size, size, 3), n * 20 % 255, dtype=np.uint8)).save(path)
        paths.append(str(path))
    return ImageListDataset(paths, [0] * len(paths), ["a"])


@pytest.mark.parametrize("sizes, on_device", [([32] * 10, True), ([128] * 10, False), ([32] * 9 + [48], False)])
def test_auto_chooses_by_image_size(tmp_path, sizes, on_device):
    # Bug caught: auto taking the per-image path for every file list, even 32-px images where it
    # does not keep up; or taking the on-device path for large or mixed-size images.
    cfg = load_config(None, [])
    choice, why = pipeline_choice(cfg, image_list(tmp_path, sizes))
    assert choice is on_device and why.startswith("auto")
    assert pipeline_choice(load_config(None, ["data.pipeline=pil"]), image_list(tmp_path, [32]))[0] is False


def test_the_choice_is_in_the_log(tmp_path, tiny_overrides):
    root = tmp_path / "folder"
    for split in ("train", "test"):
        for c in range(2):
            (root / split / f"class{c}").mkdir(parents=True)
            for n in range(6):
                Image.fromarray(np.random.RandomState(n + 10 * c).randint(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                    root / split / f"class{c}" / f"{n}.png")
    out = tmp_path / "run"
    overrides = tiny_overrides + ["method=ce", "data.name=imagefolder", f"data.root={root}",
                                  "data.imbalance_ratio=null", "pretrain.epochs=1"]
    assert main(["pretrain", "--out", str(out), *[x for o in overrides for x in ("--set", o)]]) == 0
    assert "data path: on-device batches (auto: 32x32-px images)" in (out / "log.txt").read_text()
