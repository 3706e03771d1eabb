"""Imagenette-LT: the 30-epoch recipe on a fake Imagenette tree (10 classes with Imagenette's
own file counts, 9,469 training and 3,925 val images; hard links to one tiny JPEG per class and
split, two of them grayscale) gives the split the recipe documents: the CIFAR-LT recipe at ratio
100 keeps 963 down to 9 training images per class (2,429), 50 per class are held out for
validation from the left-over training images (the head class, which keeps all of its 963,
gives up 50 of them), leaving 2,379; the official ``val/`` folder is the test split, whole.

Guards against:
- the ``val/`` folder read as the validation split (or left out) when ``data.test_folder`` is val;
- a validation split drawn from the test folder, unbalanced, or overlapping the training images;
- a long-tailed subset other than LDAM-DRW's on the sorted files, or none at all;
- grayscale photographs handed on as one-channel images.
"""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dscl.config import load_config
from dscl.data import build_splits, longtail_counts, shot_groups
from dscl.engine.runner import load_data
from dscl.errors import ConfigError, DataError

from fake_trees import linked_images

RECIPE = Path(__file__).parents[2] / "configs" / "dscl-pbsd_resnet18_b128-cos-30e_imagenette-lt-r100.yaml"
WNIDS = ["n01440764", "n02102040", "n02979186", "n03000684", "n03028079", "n03394916", "n03417042",
         "n03425413", "n03445777", "n03888257"]
TRAIN = [963, 955, 993, 858, 941, 956, 961, 931, 951, 960]  # Imagenette v2's files per class
VAL = [387, 395, 357, 386, 409, 394, 389, 419, 399, 390]
GRAY = {("train", 3), ("val", 5)}  # (split, class) whose files are grayscale


def fake_imagenette(root: Path) -> None:
    for split, sizes in (("train", TRAIN), ("val", VAL)):
        for c, (wnid, n) in enumerate(zip(WNIDS, sizes)):
            mode, colour = ("L", 60 + c) if (split, c) in GRAY else ("RGB", (c * 20, 40, 90))
            linked_images(root / split / wnid, Image.new(mode, (16, 16), colour), n)


def test_the_recipe_on_a_fake_tree_gives_the_documented_split(tmp_path):
    root = tmp_path / "imagenette2-224"
    fake_imagenette(root)
    cfg = load_config(RECIPE, [f"data.root={root}"])
    splits = load_data(cfg)
    before = longtail_counts(max(TRAIN), 10, 100.0)  # quotas from the largest class (993)
    assert before == [993, 595, 356, 213, 128, 76, 46, 27, 16, 9]
    kept = [min(q, n) for q, n in zip(before, TRAIN)]
    assert sum(kept) == 2429 and kept[0] == 963
    counts = splits.train_counts
    assert counts == [913] + kept[1:]  # the head class gives up the 50 it keeps for validation
    assert (len(splits.train), len(splits.val), len(splits.test)) == (2379, 500, 3925)
    assert np.bincount(splits.val.targets).tolist() == [50] * 10
    assert np.bincount(splits.test.targets).tolist() == VAL
    groups = shot_groups(counts)
    assert [groups.count(g) for g in ("many", "medium", "few")] == [5, 3, 2]
    # train and validation from train/, disjoint; the test split is the val/ folder, whole
    train, val, test = set(splits.train.paths), set(splits.val.paths), set(splits.test.paths)
    assert not train & val and len(train) == 2379 and len(val) == 500
    assert all(os.path.relpath(p, root).startswith("train" + os.sep) for p in train | val)
    assert test == {str(p) for p in (root / "val").rglob("*.JPEG")}
    assert splits.classes == WNIDS and splits.image_size == 128
    assert "ratio 100" in splits.selection and "50 per class held out" in splits.selection
    # grayscale files come out as RGB, in both splits
    gray_train = splits.train.targets.index(3)
    gray_test = splits.test.targets.index(5)
    for image in (splits.train[gray_train][0], splits.test[gray_test][0]):
        assert image.mode == "RGB" and np.asarray(image).shape == (16, 16, 3)
    assert cfg.pretrain.queue_size <= len(splits.train)


def test_test_folder_is_checked(tmp_path):
    root = tmp_path / "tree"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8)).save(root / split / c / f"{i}.png")
    # without data.test_folder an image folder needs test/ (val/ is its validation split)
    with pytest.raises(DataError, match="no 'test' folder"):
        build_splits("imagefolder", str(root))
    splits = build_splits("imagefolder", str(root), test_folder="val", val_per_class=1)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (4, 2, 6)
    assert all(os.sep + "val" + os.sep in p for p in splits.test.paths)
    assert not any(os.sep + "val" + os.sep in p for p in splits.val.paths)
    with pytest.raises(DataError, match=r"no 'holdout' folder for the test split \(data.test_folder\)"):
        build_splits("imagefolder", str(root), test_folder="holdout")
    base = ["data.name=imagefolder", f"data.root={root}"]
    for bad in ("train", "../val", "a/b", ".."):
        with pytest.raises(ConfigError, match="data.test_folder: must name one folder"):
            load_config(overrides=[*base, f"data.test_folder={bad}"])
    with pytest.raises(ConfigError, match="data.test_folder: applies to data.name: imagefolder only"):
        load_config(overrides=["data.name=cifar10-lt", "data.test_folder=val"])
    assert load_config(overrides=[*base, "data.test_folder=val"]).data.test_folder == "val"
