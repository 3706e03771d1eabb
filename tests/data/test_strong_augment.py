"""Strong stage-1 augmentation (AutoAugment / RandAugment, Cutout as RandomErasing): on the key
view and ce's view of the per-image path; the query view is untouched; the on-device path
refuses it by name."""

import pytest
import torch
from PIL import Image

from dscl.config import load_config
from dscl.data import ViewPatchTransform, ce_train_transform
from dscl.engine.views import stage1_transform
from dscl.errors import ConfigError


def image(seed=0):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy())


@pytest.mark.parametrize("strong", ["autoaugment", "randaugment"])
def test_strong_ops_change_the_key_view_only(strong):
    plain = ViewPatchTransform(32, 16, num_patches=2)
    heavy = ViewPatchTransform(32, 16, num_patches=2, strong=strong, erasing=1.0)
    changed = 0
    for seed in range(8):
        torch.manual_seed(seed)
        q0, k0, _, b0 = plain(image(seed))
        torch.manual_seed(seed)
        q1, k1, p1, b1 = heavy(image(seed))
        assert torch.equal(q0, q1) and torch.equal(b0, b1)  # the query view and the boxes are the same draw
        assert k1.shape == k0.shape and p1.shape == (2, 3, 16, 16)
        assert (k1 == 0).all(0).any()  # RandomErasing at p=1 left an erased (zero) rectangle
        changed += not torch.equal(k0, k1)
    assert changed == 8


def test_ce_view_takes_them_too():
    torch.manual_seed(0)
    out = ce_train_transform(32, strong="autoaugment", erasing=1.0)(image())
    assert out.shape == (3, 32, 32) and (out == 0).all(0).any()


def test_the_on_device_path_refuses_and_config_checks_the_names():
    cfg = load_config(None, ["method=dscl", "pretrain.strong_augment=randaugment"])
    with pytest.raises(ConfigError, match="data.pipeline: pil"):
        stage1_transform(cfg, 32, on_device=True)
    assert isinstance(stage1_transform(cfg, 32, on_device=False), ViewPatchTransform)
    with pytest.raises(ConfigError, match="pretrain.strong_augment"):
        load_config(None, ["pretrain.strong_augment=cutmix"])
    with pytest.raises(ConfigError, match="pretrain.random_erasing"):
        load_config(None, ["pretrain.random_erasing=1.5"])
