"""The numbers that steer training: the DSCL weight alpha per method, the stage-1 warm-up +
cosine learning rate (scaled by batch / 256) and the stage-2 step milestones, checked against
values written from the formulas here, and as the training loops really apply them."""

import csv
import math
import re
from pathlib import Path

import pytest
import torch

import dscl.engine.linear as linear_module
from dscl.cli import main
from dscl.config import load_config
from dscl.engine.distributed import Runtime
from dscl.engine.linear import train_linear
from dscl.engine.pretrain import build_stage1_model, stage1_losses, warmup_cosine
from dscl.engine.rundir import RunDir
from dscl.engine.runner import load_data
from dscl.models import build_backbone

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# --------------------------------------------------------------------------- alpha per method


@pytest.mark.parametrize("method, overrides, expected", [
    ("scl", [], None),  # bug: SCL weighted like DSCL (alpha not None) -> not the SCL baseline
    ("scl+pbsd", [], None),  # bug: only the exact name "scl" recognised as SCL
    ("dscl", [], 0.1),  # bug: default alpha lost / another default
    ("dscl+pbsd", [], 0.1),  # bug: "+pbsd" variant falls into the SCL branch
    ("dscl", ["pretrain.beta=8"], 1.0 / (1.0 + 8.0)),  # bug: beta ignored, or alpha = 1 / beta
    ("dscl+pbsd", ["pretrain.beta=8"], 1.0 / (1.0 + 8.0)),  # bug: beta ignored for the pbsd variant
    ("dscl", ["pretrain.alpha=0.3"], 0.3),  # bug: pretrain.alpha ignored
    ("scl", ["pretrain.alpha=0.3"], None),  # bug: SCL picks up a user-given alpha
    ("scl", ["pretrain.beta=8"], None),  # bug: beta turns SCL into DSCL
    ("ce", [], None),  # bug: CE reports a contrastive weight it never uses
])
def test_alpha_of_each_method(method, overrides, expected):
    alpha = load_config(None, [f"method={method}", *overrides]).alpha
    if expected is None:
        assert alpha is None
    else:
        assert alpha == pytest.approx(expected, abs=1e-12)


STAGE1 = ["pretrain.batch_size=4", "pretrain.queue_size=16", "pretrain.key_bn_groups=2", "pretrain.num_patches=2",
          "model.feature_dim=16"]


@pytest.mark.parametrize("method, overrides, expected", [
    ("scl", [], None),
    ("dscl", [], 0.1),
    ("dscl", ["pretrain.beta=8"], 1.0 / 9.0),
    ("dscl+pbsd", ["pretrain.alpha=0.3"], 0.3),
    ("scl+pbsd", ["pretrain.alpha=0.3"], None),
])
def test_stage1_losses_passes_the_methods_alpha_to_the_contrastive_loss(method, overrides, expected):
    # bug: stage1_losses passes cfg.pretrain.alpha (or a constant) instead of cfg.alpha
    cfg = load_config(None, [f"method={method}", *STAGE1, *overrides])
    torch.manual_seed(0)
    model = build_stage1_model(cfg, num_classes=3)
    b, size, patch = 4, 32, 16
    query, key = torch.randn(b, 3, size, size), torch.randn(b, 3, size, size)
    patches = torch.randn(b, 2, 3, patch, patch)
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0], [8.0, 8.0, 32.0, 32.0]]).expand(b, 2, 4).contiguous()
    labels = torch.tensor([0, 1, 2, 0])
    seen = []

    def fake_supcon(query, key, labels, queue_keys, queue_labels, **kwargs):
        seen.append(kwargs)
        return query.sum() * 0.0

    def fake_pbsd(*args, **kwargs):
        return args[0].sum() * 0.0

    loss, parts, _ = stage1_losses(model, ((query, key, patches, boxes), labels), cfg, torch.device("cpu"),
                                supcon=fake_supcon, pbsd=fake_pbsd)
    assert len(seen) == 1 and "alpha" in seen[0]
    if expected is None:
        assert seen[0]["alpha"] is None
    else:
        assert seen[0]["alpha"] == pytest.approx(expected, abs=1e-12)
    assert seen[0]["temperature"] == pytest.approx(cfg.pretrain.temperature)


# --------------------------------------------------------------------------- warm-up + cosine


def test_warmup_cosine_against_the_formula():
    base, total, warmup = 0.8, 110, 10
    # linear warm-up base * (step + 1) / warmup; bug: step / warmup (starts at 0 lr, never reaches base)
    assert warmup_cosine(base, 0, total, warmup) == pytest.approx(0.8 * 1 / 10)
    assert warmup_cosine(base, 4, total, warmup) == pytest.approx(0.8 * 5 / 10)
    # last warm-up step reaches base exactly; bug: off-by-one at the warm-up boundary
    assert warmup_cosine(base, 9, total, warmup) == pytest.approx(0.8)
    # first step after warm-up: cosine at progress 0 = base; bug: cosine counted from step 0
    assert warmup_cosine(base, 10, total, warmup) == pytest.approx(0.8)
    # midpoint of the cosine (progress 1/2): base / 2; bug: cosine over the whole run / wrong span
    assert warmup_cosine(base, 60, total, warmup) == pytest.approx(0.5 * 0.8 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine(base, 60, total, warmup) == pytest.approx(0.4)
    # a quarter of the way: 0.5 * base * (1 + cos(pi / 4)); bug: linear decay instead of cosine
    assert warmup_cosine(base, 35, total, warmup) == pytest.approx(0.5 * 0.8 * (1 + math.cos(math.pi * 25 / 100)))
    # the last step (progress 99/100) is close to 0 but positive; bug: decays to base/2 or below 0
    last = warmup_cosine(base, 109, total, warmup)
    assert last == pytest.approx(0.5 * 0.8 * (1 + math.cos(math.pi * 99 / 100)))
    assert 0 < last < 1e-3


def test_warmup_cosine_without_warmup():
    # bug: division by warmup=0, or a warm-up applied anyway
    base, total = 0.5, 20
    assert warmup_cosine(base, 0, total, 0) == pytest.approx(0.5)
    assert warmup_cosine(base, 10, total, 0) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 10 / 20)))
    assert warmup_cosine(base, 19, total, 0) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 19 / 20)))


# --------------------------------------------------------------------------- schedules in the loops


def _cli(tmp_path, command, overrides):
    out = tmp_path / "run"
    sets = [x for o in overrides for x in ("--set", o)]
    assert main([command, "--out", str(out), *sets]) == 0
    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return out, rows


def test_pretrain_loop_applies_scaled_lr_and_warmup_cosine(tmp_path, tiny_overrides):
    # bugs: lr not scaled by batch/256 (or scaled by 256/batch); the schedule driven by the
    # epoch or the step within the epoch instead of the global step; warm-up in epochs not steps
    lr, batch, steps, epochs, warmup_epochs = 0.3, 8, 3, 3, 2
    overrides = tiny_overrides + ["method=dscl", f"pretrain.lr={lr}", f"pretrain.batch_size={batch}",
                                  f"pretrain.steps_per_epoch={steps}", f"pretrain.epochs={epochs}",
                                  f"pretrain.warmup_epochs={warmup_epochs}", "pretrain.knn_every=0"]
    out, rows = _cli(tmp_path, "pretrain", overrides)
    base = 0.3 * 8 / 256  # 0.009375
    total, warmup = 3 * 3, 2 * 3
    # lr of the last step of each epoch: global steps 2, 5, 8
    expected = [base * (2 + 1) / warmup,  # warming up: half of base
                base * (5 + 1) / warmup,  # the last warm-up step: base
                0.5 * base * (1 + math.cos(math.pi * (8 - warmup) / (total - warmup)))]  # cosine, 2/3 of the way
    assert expected == pytest.approx([0.0046875, 0.009375, 0.00234375])
    pre = [r for r in rows if r["stage"] == "pretrain"]
    assert [int(r["epoch"]) for r in pre] == [1, 2, 3]
    assert [float(r["lr"]) for r in pre] == pytest.approx(expected, rel=1e-9)
    log = (out / "log.txt").read_text()
    match = re.search(r"lr (\S+) \(= (\S+) x (\d+)/256\)", log)
    assert match is not None, log
    assert float(match.group(1)) == pytest.approx(base)
    assert (float(match.group(2)), int(match.group(3))) == (pytest.approx(lr), batch)


def test_linear_loop_steps_lr_down_at_milestones(tmp_path, tiny_overrides, monkeypatch):
    # bugs: milestones counted from 1 (epoch > m), gamma applied once only, or the lr never set per epoch
    cfg = load_config(None, tiny_overrides + ["linear.lr=0.4", "linear.milestones=[1,2]", "linear.gamma=0.1",
                                              "linear.epochs=3", "linear.steps_per_epoch=1"])
    splits = load_data(cfg)
    torch.manual_seed(4)  # a random ResNet-32 without an all-zero feature on the training images
    backbone = build_backbone("resnet32")
    run = RunDir(tmp_path)
    run.prepare(cfg.to_dict(), resume=False)
    # lr 0.4 at batch 16 makes the loss of random features rise (the divergence stop would end
    # stage 2 after epoch 2); only the schedule matters here
    monkeypatch.setattr(linear_module, "check_divergence", lambda *args, **kwargs: None)
    train_linear(cfg, splits, Runtime(0, 1, torch.device("cpu")), run, backbone, resume=False)
    with open(tmp_path / "metrics.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["stage"] == "linear"]
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.4, 0.4 * 0.1, 0.4 * 0.1 * 0.1], rel=1e-9)


def test_cifar_lt_holds_out_20_validation_images_per_class_by_default():
    # Bug caught: CIFAR-LT runs without a validation split, so stage 2 keeps its last epoch and
    # nothing can be chosen without looking at test.
    assert load_config(None, ["data.name=cifar10-lt"]).val_per_class == 20
    assert load_config(None, ["data.name=cifar100-lt", "data.val_per_class=5"]).val_per_class == 5
    assert load_config(None, ["data.name=imagenet-lt"]).val_per_class == 0


@pytest.mark.parametrize("recipe", sorted(CONFIGS.glob("*cifar*.yaml")), ids=lambda p: p.name)
def test_cifar_recipes_average_keys_over_at_most_a_few_epochs(recipe):
    # Bug caught: the ImageNet EMA 0.999 at CIFAR size, where the key encoder then averages over
    # ~20 epochs and the queue is filled by a nearly untrained network (SPEC section 9).
    cfg = load_config(recipe)
    train_images = {"cifar10-lt": {100: 12406, 50: 13996, 10: 20431},
                    "cifar100-lt": {100: 10847, 50: 12608, 10: 19573}}[cfg.data.name][int(cfg.data.imbalance_ratio)]
    steps_per_epoch = train_images // cfg.pretrain.batch_size
    horizon_steps = 1 / (1 - cfg.pretrain.ema_momentum)
    assert horizon_steps <= 3 * steps_per_epoch
    assert cfg.pretrain.queue_size <= train_images - 20 * (10 if cfg.data.name == "cifar10-lt" else 100)
    assert cfg.val_per_class > 0
