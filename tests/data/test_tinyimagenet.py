"""Tiny-ImageNet-LT: the 30-epoch recipe on a fake Tiny ImageNet tree (200 classes x 500
training images, hard links to one tiny PNG per class) gives the published counts: the CIFAR-LT recipe at
ratio 100 keeps 21,549 images (500 down to 5 per class), 50 per class are held out for
validation from the left-over images (the head classes give up some of their own), leaving
21,413 training images with Many / Medium / Few = 70 / 70 / 60 classes."""

from pathlib import Path

import numpy as np
from PIL import Image

from dscl.config import load_config
from dscl.data import longtail_counts, shot_groups
from dscl.engine.runner import load_data

from fake_trees import linked_images

RECIPE = Path(__file__).parents[2] / "configs" / "dscl-pbsd_resnet32_b128-cos-30e_tinyimagenet-lt-r100.yaml"


def fake_tiny_imagenet(root: Path, classes: int = 200, train: int = 500, test: int = 2) -> None:
    for c in range(classes):
        for split, n in (("train", train), ("test", test)):
            linked_images(root / split / f"n{c:08d}", Image.new("RGB", (32, 32), (c, 40, 90)), n)


def test_the_recipe_on_a_fake_tree_gives_the_published_counts(tmp_path):
    root = tmp_path / "tinyimagenet32"
    fake_tiny_imagenet(root)
    cfg = load_config(RECIPE, [f"data.root={root}"])
    splits = load_data(cfg)
    counts = splits.train_counts
    assert (len(splits.train), len(splits.val), len(splits.test)) == (21413, 10000, 400)
    assert counts[0] == 450 and counts[-1] == 5 and counts == sorted(counts, reverse=True)
    assert np.bincount(splits.val.targets).tolist() == [50] * 200
    assert set(splits.train.paths).isdisjoint(splits.val.paths)
    groups = shot_groups(counts)
    assert [groups.count(g) for g in ("many", "medium", "few")] == [70, 70, 60]
    # before the hold-out: the CIFAR-LT counts, 500 down to 5; a class with fewer than 50 images
    # left over gives up the rest of its 50 from its own kept ones
    before = longtail_counts(500, 200, 100.0)
    assert sum(before) == 21549 and before[-1] == 5
    assert counts == [min(n, 450) for n in before]
    assert splits.image_size == 32
