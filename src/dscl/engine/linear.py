"""Stage 2: a fresh linear classifier on the frozen backbone, with class-balanced sampling (or,
with ``linear.rebalance: loss``, natural sampling and the logit-adjusted loss).

The backbone stays in eval mode (BatchNorm statistics frozen) and takes no gradient; after
training we check, bit for bit, that none of its weights or buffers changed (as MoCo v3's
linear probe does). The best epoch is chosen on the validation split when there is one,
never on the test split.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config import Config, LinearConfig
from ..data import ClassBalancedSampler, DataSplits, NaturalSampler
from ..errors import NumericalError
from ..losses import log_prior
from ..progress import progress
from ..models import Classifier, ExpertClassifier, build_classifier
from .distributed import Runtime
from .evaluate import accuracy_report, extract_features
from .experts import classifier_loss
from .loaders import EpochBatches, steps_per_epoch
from .pretrain import build_encoder
from .step import EpochMeter, LastCheckpoint, autocast, prepare_model, set_lr, stop_if_not_finite, to_device
from .rundir import RunDir
from ..seeding import mix_seed
from .views import linear_transform, split_loader


def stage1_backbone_prefix(cfg: Config) -> str:
    """Where the query encoder f sits in a stage-1 state dict."""
    return "encoder." if cfg.method_spec.contrastive else "backbone."


def backbone_from_stage1(cfg: Config, state: dict) -> nn.Module:
    """The query encoder f of a stage-1 state dict (MomentumContrast, MultiExpertContrast or the CE Classifier)."""
    prefix = stage1_backbone_prefix(cfg)
    backbone = build_encoder(cfg, zero_init_residual=False)
    backbone.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return backbone


def freeze(module: nn.Module) -> dict:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_unchanged(module: nn.Module, snapshot: dict) -> None:
    changed = [k for k, v in module.state_dict().items() if not torch.equal(v, snapshot[k])]
    if changed:
        raise RuntimeError(f"stage 2 changed frozen backbone tensors: {changed[:5]}")


def clean_features(backbone: nn.Module, cfg: Config, dataset, image_size: int, rt: Runtime,
                   desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (on ``rt.device``) and labels of every un-augmented image of ``dataset``."""
    loader = split_loader(cfg, dataset, image_size, rt.device)
    features, labels = extract_features(backbone, loader, device=rt.device, progress=rt.is_main, desc=desc)
    return features.to(rt.device), labels.to(rt.device)


def fit_standardizer(model: Classifier | ExpertClassifier, cfg: Config, splits: DataSplits,
                     rt: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """Set the classifier's feature standardisation from the un-augmented training features;
    returns those features and their labels."""
    features, labels = clean_features(model.backbone, cfg, splits.train, splits.image_size, rt, "feature statistics")
    model.norm.fit(features)
    return features, labels


def selection_of(best: dict) -> dict:
    """What results.json says about the stage-2 epoch that was kept."""
    return {"selected_on": "val" if best["val"] is not None else "last_epoch",
            "best_epoch": best["epoch"], "best_val_top1": best["val"]}


def train_linear(cfg: Config, splits: DataSplits, rt: Runtime, run: RunDir, backbone: nn.Module,
                 resume: bool, after_epoch=None) -> tuple[Classifier | ExpertClassifier, dict]:
    """Train the classifier; returns backbone + the selected linear layer (on ``rt.device``) and :func:`selection_of`
    the kept epoch. A multi-expert backbone gets a linear layer (and a standardiser) per expert, each trained on its
    own cross-entropy; the kept epoch is the ensemble's best. ``after_epoch(epoch, model)`` sees each epoch's model."""
    lc = cfg.linear
    backbone = backbone.to(rt.device)
    snapshot = freeze(backbone)
    model = build_classifier(backbone, splits.num_classes).to(rt.device).eval()  # no mode-dependent layer after f
    prepare_model(model, cfg)
    torch.manual_seed(mix_seed(cfg.seed, 4))
    model.fc.reset_parameters()
    optimizer = torch.optim.SGD(model.fc.parameters(), lr=lc.lr, momentum=lc.momentum, weight_decay=lc.weight_decay)
    start_epoch, start_step, best = 0, 0, {"epoch": 0, "val": None, "fc": model.fc.state_dict()}
    start_loss, train_cache = None, None
    last = LastCheckpoint(run, cfg, "linear", "stage 2", optimizer, fc=model.fc, norm=model.norm)
    if resume and (state := last.resume()):
        start_epoch, start_step, best, start_loss = state["epoch"], state["step"], state["best"], state["start_loss"]
    elif lc.standardize:
        train_cache = fit_standardizer(model, cfg, splits, rt)
    if not lc.augment and train_cache is None:
        train_cache = clean_features(backbone, cfg, splits.train, splits.image_size, rt, "training features")
    fc = DistributedDataParallel(model.fc) if rt.distributed else model.fc
    local_batch = max(1, lc.batch_size // rt.world_size)
    steps = steps_per_epoch(len(splits.train), lc.batch_size, lc.steps_per_epoch)
    balanced = lc.rebalance == "sampler"
    sampler = (ClassBalancedSampler if balanced else NaturalSampler)(
        splits.train.targets, num_samples=steps * local_batch * rt.world_size, seed=mix_seed(cfg.seed, 5) % 2**31,
        rank=rt.rank, world_size=rt.world_size)
    log_pi = None if balanced else log_prior(splits.train_counts).to(rt.device)
    epoch_features = feature_batches(cfg, splits, rt, backbone, train_cache, local_batch, steps)
    val = (None if splits.val is None  # the backbone is frozen: validation features are the same every epoch
           else clean_features(backbone, cfg, splits.val, splits.image_size, rt, "validation features"))
    run.log(f"stage 2: {describe_stage2(lc, val is not None, steps, local_batch * rt.world_size)}")
    for epoch in range(start_epoch, lc.epochs):
        lr = lc.lr * lc.gamma ** sum(epoch >= m for m in lc.milestones)
        set_lr(optimizer, lr)
        sampler.set_epoch(epoch)
        meter = EpochMeter()
        bar = progress(epoch_features(list(sampler), epoch, start_step), desc=f"linear {epoch + 1}/{lc.epochs}",
                   initial=start_step, total=steps, enabled=rt.is_main, leave=False)
        for step, (features, labels) in enumerate(bar, start=start_step):
            with torch.no_grad():
                features = model.norm(features)
            logits = fc(features)  # (N, C), or (N, E, C) for experts
            loss = classifier_loss(logits if log_pi is None else logits + lc.la_tau * log_pi, labels)
            stop_if_not_finite(loss, f"stage 2, epoch {epoch + 1}, step {step + 1}", f"lower linear.lr (now {lc.lr:g})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            meter.add({"loss": loss.item()})
            start_loss = loss.item() if start_loss is None else start_loss
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if last.due(step, steps):
                last.save(epoch, step + 1, best=best, start_loss=start_loss)
        row = meter.row("linear", epoch + 1, lr, local_batch)
        check_divergence(row["loss"], start_loss, epoch, lc.lr)
        if val is not None:
            with torch.no_grad():
                preds = model.head(val[0]).argmax(1)
            row["val_top1"] = round(accuracy_report(preds.cpu(), val[1].cpu(), splits.train_counts)["overall"], 4)
        on_val = val is not None and lc.select == "best"  # else the last epoch is kept
        if not on_val or best["val"] is None or row["val_top1"] > best["val"]:
            best = {"epoch": epoch + 1, "val": row["val_top1"] if on_val else None,
                    "fc": {k: v.clone() for k, v in model.fc.state_dict().items()}}
        run.add_metrics(row)
        if after_epoch is not None:
            after_epoch(epoch + 1, model)
        start_step = 0
        last.save(epoch + 1, 0, best=best, start_loss=start_loss)
    assert_unchanged(backbone, snapshot)
    model.fc.load_state_dict(best["fc"])
    selection = selection_of(best)
    run.log(f"stage 2: kept epoch {selection['best_epoch']} ("
            + (f"validation top-1 {best['val']:.2f}%)" if best["val"] is not None else "the last one)"))
    run.save(run.checkpoint("linear_best"), {"stage": "linear", "fc": model.fc.state_dict(),
                                              "norm": model.norm.state_dict(), "best_epoch": best["epoch"],
                                              "best_val": best["val"], "complete": True})
    return model, selection


def feature_batches(cfg: Config, splits: DataSplits, rt: Runtime, backbone: nn.Module, train_cache, local_batch: int,
                    steps: int):
    """``epoch_features(order, epoch, start_step)``: stage 2's (features, labels) batches, of fresh
    augmented views (``linear.augment``) or rows of ``train_cache`` (un-augmented, extracted once)."""
    if cfg.linear.augment:
        batches = EpochBatches(cfg, splits.train, lambda on_device: linear_transform(cfg, splits.image_size, on_device),
                               rt, batch=local_batch, seed=cfg.seed + 1)

        def epoch_features(order, epoch, start_step):
            for images, labels in batches.epoch(order, epoch, start_step):
                with torch.no_grad(), autocast(cfg, rt.device):  # no yield inside: it would hold no_grad
                    features = backbone(to_device(images, rt.device, cfg)).float()
                yield features, labels.to(rt.device)
    else:
        def epoch_features(order, epoch, start_step):
            order = torch.as_tensor(order, device=rt.device)
            for step in range(start_step, steps):
                index = order[step * local_batch : (step + 1) * local_batch]
                yield train_cache[0][index], train_cache[1][index]
    return epoch_features


def describe_stage2(lc: LinearConfig, has_val: bool, steps: int, batch: int) -> str:
    """How stage 2 trains and which epoch it keeps, for the run's log."""
    how = ("class-balanced" if lc.rebalance == "sampler"
           else f"natural sampling, logit-adjusted loss (tau {lc.la_tau:g})")
    features = "features of " + ("fresh augmented views" if lc.augment else "the un-augmented images (extracted once)")
    kept = ("best epoch chosen on validation" if has_val and lc.select == "best"
            else "last epoch kept (linear.select: last)" if has_val else "no validation split: last epoch kept")
    return (f"{how}, {steps} steps/epoch, effective batch {batch}, lr {lc.lr:g}, "
            f"{'standardised' if lc.standardize else 'raw'} {features}, {kept}")


DIVERGENCE_FACTOR = 3.0


def check_divergence(epoch_loss: float, start_loss: float | None, epoch: int, lr: float) -> None:
    """Stop when an epoch's mean loss has grown far above the loss of the first step."""
    if start_loss is not None and epoch_loss > DIVERGENCE_FACTOR * start_loss:
        raise NumericalError(f"stage 2 diverges: mean loss {epoch_loss:.3g} in epoch {epoch + 1} against "
                             f"{start_loss:.3g} at its first step; lower linear.lr (now {lr:g})")
