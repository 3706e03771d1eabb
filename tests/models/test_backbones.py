"""Backbones as the recipes initialise them: every channel trains, frozen stages stay frozen."""

import pytest
import torch
import torch.nn.functional as F

from dscl.config import load_config
from dscl.engine.pretrain import build_stage1_model


@pytest.mark.parametrize("backbone", ["resnet32", "resnet18"])
def test_nearly_all_final_channels_vary_after_a_few_steps(backbone):
    # Bug caught: zero-init of the last BN gamma on ResNet-32, whose option-A shortcuts pad new
    # channels with zeros; those channels are then exactly 0 after the ReLU and never recover.
    torch.manual_seed(0)
    cfg = load_config(None, ["method=ce", f"model.backbone={backbone}"])
    model = build_stage1_model(cfg, num_classes=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(32, 3, 32, 32)
    y = torch.arange(32) % 4
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        features = model.backbone(x)  # (B, C)
    live = (features.std(0) > 1e-6).float().mean()
    assert live >= 0.9, f"only {live:.0%} of the {features.shape[1]} final channels vary across the batch"


def test_places_style_fine_tuning_keeps_frozen_stages_in_eval_mode():
    # Bug caught: the frozen stages' BatchNorm left in train mode, so their pretrained running
    # statistics are overwritten by the new data during stage 1.
    cfg = load_config(None, ["method=dscl", "model.backbone=resnet18", "model.train_last_stage_only=true",
                             "pretrain.queue_size=256"])
    model = build_stage1_model(cfg, num_classes=4)
    model.train()
    for encoder in (model.encoder, model.key_encoder):
        frozen_bn = [m for name, m in encoder.named_modules()
                     if isinstance(m, torch.nn.BatchNorm2d) and not name.startswith("layer4")]
        last_bn = [m for name, m in encoder.named_modules()
                   if isinstance(m, torch.nn.BatchNorm2d) and name.startswith("layer4")]
        assert frozen_bn and last_bn
        assert not any(m.training for m in frozen_bn)
        assert all(m.training for m in last_bn)
    before = model.encoder.stem[1].running_mean.clone()
    model(torch.randn(8, 3, 64, 64), torch.randn(8, 3, 64, 64))
    assert torch.equal(model.encoder.stem[1].running_mean, before)
    trainable = {n.split(".")[0] for n, p in model.encoder.named_parameters() if p.requires_grad}
    assert trainable == {"layer4"}
