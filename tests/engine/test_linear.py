import copy

import pytest
import torch

import dscl.engine.linear as linear_module
from dscl.config import load_config
from dscl.data import CIFAR_MEAN, CIFAR_STD
from dscl.engine.checkpoint import load_checkpoint
from dscl.engine.distributed import Runtime
from dscl.engine.evaluate import predict
from dscl.engine.experts import classifier_loss
from dscl.engine.linear import backbone_from_stage1, fit_standardizer, train_linear
from dscl.engine.pretrain import build_stage1_model
from dscl.engine.rundir import RunDir
from dscl.engine.runner import load_data
from dscl.seeding import mix_seed, seed_everything
from dscl.engine.views import linear_transform, split_loader
from dscl.errors import NumericalError
from dscl.models import Classifier, build_backbone


def test_linear_stage_leaves_backbone_bitwise_unchanged(tmp_path, tiny_overrides):
    cfg = load_config(None, tiny_overrides)
    splits = load_data(cfg)
    seed_everything(0)  # the random backbone, not whatever the tests before left in the generator
    backbone = build_backbone("resnet32")
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    run = RunDir(tmp_path)
    run.prepare(cfg.to_dict(), resume=False)
    model, _ = train_linear(cfg, splits, Runtime(0, 1, torch.device("cpu")), run, backbone, resume=False)
    after = model.backbone.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats included
    assert not model.backbone.training
    assert not torch.equal(model.fc.weight, torch.zeros_like(model.fc.weight))
    assert (tmp_path / "checkpoints" / "linear_best.pt").is_file()


# --------------------------------------------------------------------------- helpers

CPU = Runtime(0, 1, torch.device("cpu"))


def setup_stage2(tmp_path, overrides, seed=4):
    """Config, splits, an empty run folder and a random ResNet-32 (seed 4: none of its pooled
    features is constant on the tiny training set, so the std floor plays no part)."""
    cfg = load_config(None, overrides)
    splits = load_data(cfg)
    torch.manual_seed(seed)
    backbone = build_backbone("resnet32")
    run = RunDir(tmp_path / "run")
    run.prepare(cfg.to_dict(), resume=False)
    return cfg, splits, run, backbone


def recording_cross_entropy(targets: list):
    """Stage 2's loss function, recording the labels it is given."""
    def loss(logits, target):
        targets.append(target.detach().cpu().clone())
        return classifier_loss(logits, target)
    return loss


# --------------------------------------------------------------------------- class-balanced batches


def test_classifier_sees_class_balanced_labels(tmp_path, tiny_overrides, monkeypatch):
    # bug: stage 2 samples the training set naturally (shuffled order / sampler not used), so
    # the head class fills about half of every batch
    overrides = tiny_overrides + ["data.imbalance_ratio=10", "data.synthetic_classes=5", "linear.batch_size=40",
                                  "linear.steps_per_epoch=3", "linear.epochs=4"]
    cfg, splits, run, backbone = setup_stage2(tmp_path, overrides)
    counts = splits.train_counts
    num_classes = len(counts)
    assert num_classes == 5
    assert max(counts) / sum(counts) > 0.4  # natural sampling would give the head class ~half
    assert min(counts) / sum(counts) < 0.1
    seen = []
    monkeypatch.setattr(linear_module, "classifier_loss", recording_cross_entropy(seen))
    train_linear(cfg, splits, CPU, run, backbone, resume=False)
    labels = torch.cat(seen)
    assert len(labels) == 4 * 3 * 40  # epochs x steps x batch, >= 400
    share = torch.bincount(labels, minlength=num_classes).double() / len(labels)
    assert share.min() >= 0.6 / num_classes, share
    assert share.max() <= 1.4 / num_classes, share


# --------------------------------------------------------------------------- epoch selection on val


def test_best_validation_epoch_is_kept_not_the_last(tmp_path, tiny_overrides, monkeypatch):
    # bugs: the last epoch kept; the best fc stored by reference (so it follows later epochs);
    # the epoch chosen on the lowest score
    overrides = tiny_overrides + ["linear.epochs=3", "linear.milestones=[]"]
    cfg, splits, run, backbone = setup_stage2(tmp_path, overrides)
    assert splits.val is not None
    scripted = iter([10.0, 50.0, 20.0])
    fc_at_val = []

    class RecordingClassifier(Classifier):  # head() scores the validation features
        def head(self, features):
            fc_at_val.append({k: v.detach().clone() for k, v in self.fc.state_dict().items()})
            return super().head(features)

    monkeypatch.setattr(linear_module, "build_classifier", RecordingClassifier)  # one expert
    monkeypatch.setattr(linear_module, "accuracy_report", lambda *args, **kwargs: {"overall": next(scripted)})
    model, selection = train_linear(cfg, splits, CPU, run, backbone, resume=False)
    assert selection == {"selected_on": "val", "best_epoch": 2, "best_val_top1": 50.0}
    assert len(fc_at_val) == 3
    assert not torch.equal(fc_at_val[1]["weight"], fc_at_val[2]["weight"])  # epoch 3 did train
    assert torch.equal(model.fc.weight, fc_at_val[1]["weight"])
    assert torch.equal(model.fc.bias, fc_at_val[1]["bias"])
    assert not torch.equal(model.fc.weight, fc_at_val[2]["weight"])
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "linear_best.pt")
    assert saved["best_epoch"] == 2 and saved["best_val"] == 50.0
    assert torch.equal(saved["fc"]["weight"], fc_at_val[1]["weight"])
    assert [row["val_top1"] for row in run.metrics if row["stage"] == "linear"] == [10.0, 50.0, 20.0]


# --------------------------------------------------------------------------- divergence stop


@pytest.mark.parametrize("lr, diverges", [(1000.0, True), (0.05, False)])
def test_diverging_stage2_stops_and_names_linear_lr(tmp_path, tiny_overrides, lr, diverges):
    # bugs: no stop (a diverged probe is selected and reported); a stop that fires on a healthy run
    overrides = tiny_overrides + [f"linear.lr={lr}", "linear.epochs=3", "linear.steps_per_epoch=3",
                                  "linear.milestones=[]"]
    cfg, splits, run, backbone = setup_stage2(tmp_path, overrides)
    if diverges:
        with pytest.raises(NumericalError, match=r"linear\.lr"):
            train_linear(cfg, splits, CPU, run, backbone, resume=False)
    else:
        train_linear(cfg, splits, CPU, run, backbone, resume=False)
        assert len([r for r in run.metrics if r["stage"] == "linear"]) == 3


# --------------------------------------------------------------------------- feature standardisation


def clean_training_features(backbone, splits) -> torch.Tensor:
    """Pooled features of the un-augmented training images, written out here: uint8 -> [0, 1] ->
    (x - CIFAR mean) / CIFAR std at their native 32 px, eval-mode backbone, one batch."""
    images = torch.from_numpy(splits.train.data)
    assert images.dtype == torch.uint8 and tuple(images.shape[1:]) == (32, 32, 3) and splits.image_size == 32
    x = images.permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    backbone.eval()
    with torch.no_grad():
        return backbone(x)


def test_standardiser_holds_mean_and_population_std_of_clean_training_features(tmp_path, tiny_overrides):
    # bugs: statistics of augmented views, of train-mode BN, with ImageNet normalisation, of the
    # val/test split, with the unbiased (N - 1) std, or never fitted (zeros / ones)
    overrides = tiny_overrides + ["linear.epochs=1", "linear.steps_per_epoch=1"]
    cfg, splits, run, backbone = setup_stage2(tmp_path, overrides)
    reference = copy.deepcopy(backbone)
    model, _ = train_linear(cfg, splits, CPU, run, backbone, resume=False)
    features = clean_training_features(reference, splits)
    n = features.shape[0]
    assert n == len(splits.train) == sum(splits.train_counts)
    mean = features.sum(0) / n
    std = ((features - mean) ** 2).sum(0).div(n).sqrt()
    assert std.min() > 1e-3  # no constant feature: the unbiased / population difference shows
    torch.testing.assert_close(model.norm.mean, mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.norm.std, std, rtol=1e-4, atol=1e-6)
    unbiased = ((features - mean) ** 2).sum(0).div(n - 1).sqrt()
    assert (model.norm.std - unbiased).abs().max() > 10 * (model.norm.std - std).abs().max()


@pytest.mark.parametrize("augment", [False, True])
def test_cached_stage2_feeds_standardised_clean_features(tmp_path, tiny_overrides, monkeypatch, augment):
    # linear.augment=false: every fc input row is the standardised feature of a clean training
    # image (and the labels are that image's); augment=true must not match (fresh views).
    # bugs: raw features cached, the cache indexed with another order than the labels, views
    # silently augmented or not
    overrides = tiny_overrides + [f"linear.augment={str(augment).lower()}", "linear.epochs=2",
                                  "linear.steps_per_epoch=3", "linear.milestones=[]"]
    cfg, splits, run, backbone = setup_stage2(tmp_path, overrides)
    reference = clean_training_features(copy.deepcopy(backbone), splits)
    targets = torch.as_tensor(splits.train.targets)
    seen = []

    class RecordingClassifier(Classifier):
        def __init__(self, *args):
            super().__init__(*args)
            self.fc.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach().clone()))

    labels = []
    monkeypatch.setattr(linear_module, "classifier_loss", recording_cross_entropy(labels))
    monkeypatch.setattr(linear_module, "build_classifier", RecordingClassifier)  # one expert
    model, _ = train_linear(cfg, splits, CPU, run, backbone, resume=False)
    rows = torch.cat([x for x in seen if x.shape[0] == cfg.linear.batch_size])  # training batches, not validation
    assert rows.shape[0] == 2 * 3 * cfg.linear.batch_size
    distance, nearest = torch.cdist(rows, model.norm(reference), compute_mode="donot_use_mm_for_euclid_dist").min(1)
    if augment:
        assert (distance > 1e-2).float().mean() > 0.9
    else:
        assert distance.max() < 1e-3
        assert torch.equal(targets[nearest], torch.cat(labels))


def test_validation_score_of_the_kept_epoch_is_the_models_accuracy(tmp_path, tiny_overrides):
    # the per-epoch validation score uses cached features; it must be what the whole model scores
    overrides = tiny_overrides + ["linear.epochs=1", "linear.steps_per_epoch=2", "linear.augment=false"]
    cfg, splits, run, backbone = setup_stage2(tmp_path, overrides)
    model, selection = train_linear(cfg, splits, CPU, run, backbone, resume=False)
    preds, truth = predict(model, split_loader(cfg, splits.val, splits.image_size, CPU.device), device=CPU.device)
    assert selection["best_val_top1"] == pytest.approx(100.0 * float((preds == truth).double().mean()))


def test_feature_constant_on_clean_images_does_not_blow_up_on_augmented_views(tiny_overrides):
    # The backbone stage 1 starts from at seed 0 (what `dscl run --set pretrain.epochs=0` hands to
    # stage 2) has a pooled feature that is exactly 0 on every clean training image (a dead ReLU
    # channel) but ~0.01-0.04 on some augmented views: with std clamped to 1e-6 the probe's
    # input reached ~3e4 and stage 2 at a modest lr (0.04) tripped the divergence stop.
    cfg = load_config(None, tiny_overrides + ["method=dscl", "seed=0"])
    splits = load_data(cfg)
    seed_everything(mix_seed(cfg.seed, 0))  # as pretrain() does before building the model
    backbone = backbone_from_stage1(cfg, build_stage1_model(cfg, splits.num_classes).state_dict()).eval()
    features = clean_training_features(backbone, splits)
    assert features.std(0, unbiased=False).min() == 0.0  # the precondition of this case
    model = Classifier(backbone, splits.num_classes).eval()
    fit_standardizer(model, cfg, splits, CPU)
    views = linear_transform(cfg, splits.image_size, on_device=True)
    images = torch.from_numpy(splits.train.data)
    with torch.no_grad():
        z = model.norm(backbone(views(images, generator=torch.Generator().manual_seed(0))))
    assert z.abs().max() < 100  # unit-scale inputs are the point of the standardiser
