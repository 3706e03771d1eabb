"""A user's own image folder is trained on as it is: ``data.imbalance_ratio`` defaults to "the
data set's default", which keeps every file of an image folder and is 100 for CIFAR-LT and the
synthetic set. The run's log says how many images per class it trains on and why any were left
out, and a class left without training images names what removed them.

Guards against:
- an image folder cut down to a ratio-100 long tail without being asked (a 2-class folder of 6
  images each failed with "class 1 (b) has no training image", the class had 6);
- CIFAR-LT or the synthetic set losing their default ratio of 100;
- a recipe that relied on the old default of 100 without saying so (its runs would change);
- an error about a class without training images that does not say what removed them.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from PIL import Image

from dscl.config import Config, config_from_dict, flatten_config, load_config
from dscl.data import build_splits, longtail_counts
from dscl.engine.distributed import Runtime
from dscl.engine.runner import load_data, run
from dscl.errors import DataError

CONFIGS = Path(__file__).parents[2] / "configs"
SUBSAMPLED = ("synthetic", "cifar10-lt", "cifar100-lt", "imagefolder")  # data sets a ratio applies to


def two_classes(root: Path, per_class: int = 6) -> Path:
    for split, n in (("train", per_class), ("test", 2)):
        for c, name in enumerate("ab"):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (c * 100, 20, i)).save(root / split / name / f"{i}.png")
    return root


def log_of(cfg: Config, out: Path) -> str:
    """The data lines a run writes, without training (no stage asked for)."""
    run(cfg, out, Runtime(0, 1, torch.device("cpu")), stages=())
    return (out / "log.txt").read_text()


def test_a_users_folder_is_kept_whole_and_the_log_says_so(tmp_path):
    root = two_classes(tmp_path / "photos")
    cfg = load_config(overrides=["data.name=imagefolder", f"data.root={root}", "data.val_per_class=0"])
    assert cfg.data.imbalance_ratio is None
    assert load_data(cfg).train_counts == [6, 6]
    log = log_of(cfg, tmp_path / "run")
    assert "12 train / 0 val / 4 test images, 2 classes, training images per class 6, 6" in log
    assert "no long-tailed subset (data.imbalance_ratio not set): all 12 training images" in log
    held = load_config(overrides=["data.name=imagefolder", f"data.root={root}", "data.val_per_class=2",
                                  "data.imbalance_ratio=2"])
    log = log_of(held, tmp_path / "run2")
    # 6 and int(6 / 2) = 3 kept; 2 each held out, class a's from its kept images (it has no others)
    assert "7 train / 4 val / 4 test images, 2 classes, training images per class 4, 3" in log
    assert ("long-tailed subset at ratio 2 (data.imbalance_ratio): kept 9 of 12 training images; "
            "2 per class held out for validation (data.val_per_class, 2 of them from the kept images") in log


def test_a_class_without_training_images_names_what_removed_them(tmp_path):
    root = str(two_classes(tmp_path / "photos"))
    with pytest.raises(DataError, match=r"class 1 \(b\) has no training image left: the long-tailed subset at "
                                        r"ratio 100 \(data.imbalance_ratio, exponential profile\) keeps 0 of its 6 "
                                        r"images; set data.imbalance_ratio: null to keep every file"):
        build_splits("imagefolder", root, imbalance_ratio=100)
    with pytest.raises(DataError, match=r"class 0 \(a\) would have no training image left: it has 6 images and "
                                        r"data.val_per_class holds out 6 per class for validation"):
        build_splits("imagefolder", root, val_per_class=6)
    assert build_splits("imagefolder", root, val_per_class=5).train_counts == [1, 1]


def test_cifar_and_synthetic_keep_their_default_of_100(tmp_path, monkeypatch):
    class FakeCIFAR:
        def __init__(self, root, train=True, download=False):
            per_class = 5000 if train else 10
            self.targets = np.random.default_rng(1).permutation(np.repeat(np.arange(10), per_class)).tolist()
            self.data = np.zeros((len(self.targets), 1, 1, 3), np.uint8)
            self.classes = [f"k{c}" for c in range(10)]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR)
    assert Config().data.imbalance_ratio is None
    cfg = load_config(overrides=["data.name=cifar10-lt", f"data.root={tmp_path}"])
    assert cfg.data.imbalance_ratio == 100.0  # filled in, so the run's config.yaml says what it trained on
    splits = load_data(cfg)
    assert splits.train_counts == [4980] + longtail_counts(5000, 10, 100)[1:]  # 20 per class held out
    assert "ratio 100 (data.imbalance_ratio): kept 12406 of 50000" in splits.selection
    synthetic = load_data(load_config(overrides=["data.synthetic_n_max=200", "data.synthetic_eval_per_class=2"]))
    assert synthetic.train_counts == longtail_counts(200, 10, 100)
    direct = build_splits("synthetic", synthetic_options={"n_max": 200, "n_per_class_eval": 2})
    assert direct.train_counts == synthetic.train_counts
    assert "ratio 100 (the default of this data set)" in direct.selection


def recipe_data(path: Path) -> dict:
    """The ``data`` keys a recipe states, with those of the recipes it inherits from (``base: FILE``)."""
    values = yaml.safe_load(path.read_text())
    data = dict(values.get("data") or {})
    return {**recipe_data(path.parent / values["base"]), **data} if "base" in values else data


@pytest.mark.parametrize("recipe", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_recipe_states_its_ratio(recipe):
    """A recipe on a data set that a ratio subsamples says which ratio (or null): none leans on a
    default, and a run folder made before the default changed (its config.yaml holds the value
    explicitly, and none of the keys added since) still has the recipe's configuration, key for
    key, as ``dscl sweep`` compares them."""
    data = recipe_data(CONFIGS / recipe)
    if data.get("name", "synthetic") in SUBSAMPLED:
        assert "imbalance_ratio" in data, f"{recipe}: data.imbalance_ratio not stated"
    cfg = load_config(CONFIGS / recipe)
    old = cfg.to_dict()
    if old["data"]["test_folder"] == "test":
        del old["data"]["test_folder"]  # a key older run folders do not have
    assert flatten_config(config_from_dict(old).to_dict()) == flatten_config(cfg.to_dict())
