"""Stage 1: DSCL / SCL (+ PBSD) representation learning, or the end-to-end CE baseline.

One loop, the same on one CPU process, one GPU, or N processes under torchrun::

    for each batch (g1, g2, patches, boxes, y):
        z, k, c, s = model(g1, g2, patches, boxes)          # momentum update + keys inside
        loss = L_dscl(z, k, y, queue) + lambda * L_pbsd(c, s, k, queue)
        step the optimiser; model.enqueue(the keys of all ranks, their labels)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config import Config
from ..data import DataSplits
from ..errors import ConfigError
from ..losses import (decoupled_supcon_loss, effective_number_weights, log_prior,
                      logit_adjusted_loss, patch_distillation_loss)
from ..progress import progress
from ..models import (Classifier, ContrastOutput, LabelledQueue, MomentumContrast, MultiExpertContrast, build_backbone,
                      build_multi_expert_backbone, counted_once)
from .distributed import Runtime, all_gather_cat
from .loaders import EpochBatches, shuffled_order, steps_per_epoch
from .rundir import RunDir
from ..seeding import mix_seed, seed_everything
from .evaluate import extract_features, knn_predict
from .experts import mean_over_experts
from .step import (EpochMeter, FiniteCheck, LastCheckpoint, autocast, check_can_compile, prepare_model, set_lr,
                   to_device, unwrap)
from .views import split_loader, stage1_transform


def build_encoder(cfg: Config, *, pretrained: str | None = None, zero_init_residual: bool = True) -> nn.Module:
    """The backbone of ``model.backbone``, multi-expert when ``model.experts > 1``."""
    if cfg.model.experts == 1:
        return build_backbone(cfg.model.backbone, pretrained=pretrained, zero_init_residual=zero_init_residual)
    return build_multi_expert_backbone(cfg.model.backbone, cfg.model.experts, width=cfg.model.expert_width,
                                       pretrained=pretrained, zero_init_residual=zero_init_residual)


def build_stage1_model(cfg: Config, num_classes: int) -> nn.Module:
    """The stage-1 model: the CE classifier, or the momentum-contrast model (its multi-expert kind
    with ``model.experts > 1``; ``experts: 1`` is the plain model, unchanged)."""
    backbone = build_encoder(cfg, pretrained=cfg.model.pretrained, zero_init_residual=cfg.model.pretrained is None)
    if cfg.model.train_last_stage_only:
        backbone.freeze_early_stages()
    if not cfg.method_spec.contrastive:
        return Classifier(backbone, num_classes)
    p = cfg.pretrain
    model = MultiExpertContrast if cfg.model.experts > 1 else MomentumContrast
    return model(backbone, feature_dim=cfg.model.feature_dim, queue_size=p.queue_size, momentum=p.ema_momentum,
                 key_bn_groups=p.key_bn_groups, patch_bn_stats=p.patch_bn_stats,
                 num_classes=num_classes if p.queue_sampling == "balanced" else None,
                 teacher=None if p.patch_mode == "multicrop" else p.pbsd_teacher)


def anchor_weights(cfg: Config, train_counts) -> torch.Tensor | None:
    """Per-class weights of the contrastive anchors (``pretrain.reweight``), or None."""
    if cfg.pretrain.reweight == "none":
        return None
    return effective_number_weights(torch.as_tensor(train_counts), cfg.pretrain.reweight_beta)


def loss_priors(cfg: Config, train_counts) -> torch.Tensor | None:
    """(C,) log class frequencies of the training split for a logit-adjusted loss, or None."""
    return log_prior(train_counts) if cfg.method_spec.logit_adjusted else None


def warmup_cosine(base_lr: float, step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``base_lr`` to 0."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * progress))


def stage1_losses(model: nn.Module, batch, cfg: Config, device: torch.device, *,
                  supcon=decoupled_supcon_loss, pbsd=patch_distillation_loss,
                  class_weight: torch.Tensor | None = None, num_classes: int | None = None,
                  log_pi: torch.Tensor | None = None) -> tuple[torch.Tensor, dict, torch.Tensor | None]:
    """Loss of one batch, its parts (what the metrics log) and its keys for the queue (None for
    a classifier trained end to end), for any method. ``supcon`` / ``pbsd``: the loss functions;
    ``class_weight``: (C,) anchor weights (:func:`anchor_weights`); ``num_classes``: given, the losses
    never wait for the device to find it; ``log_pi``: (C,) log priors of a logit-adjusted loss.
    A multi-expert model's outputs go through :func:`contrastive_losses` each against its own queue,
    their mean the batch's loss. Under ``precision: bf16`` only the networks run in bf16: the
    losses take float32 (logits over a large queue at tau = 0.07 need the mantissa)."""
    views, labels = batch
    labels = labels.to(device, non_blocking=True)
    if not cfg.method_spec.contrastive:
        with autocast(cfg, device), counted_once(unwrap(model)):
            logits = model(to_device(views, device, cfg)).float()
        loss = (F.cross_entropy(logits, labels) if log_pi is None
                else logit_adjusted_loss(logits, labels, log_pi, cfg.pretrain.la_tau))
        return loss, {"loss": loss}, None
    query_view, key_view, patches, boxes = views
    use_patches = cfg.uses_pbsd
    with autocast(cfg, device):
        out = model(to_device(query_view, device, cfg), to_device(key_view, device, cfg),
                    to_device(patches, device, cfg) if use_patches else None,
                    boxes.to(device) if use_patches else None)
    queue, weight = unwrap(model).queue, None if class_weight is None else class_weight.to(device)[labels]
    losses = functools.partial(contrastive_losses, labels=labels, cfg=cfg, supcon=supcon, pbsd=pbsd, weight=weight,
                               num_classes=num_classes)
    if isinstance(out, list):  # a multi-expert model: one output per expert, each against its own queue
        return mean_over_experts([losses(expert, queue[e]) for e, expert in enumerate(out)])
    return losses(out, queue)


def contrastive_losses(out: ContrastOutput, queue: LabelledQueue, *, labels: torch.Tensor, cfg: Config, supcon, pbsd,
                       weight: torch.Tensor | None, num_classes: int | None) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """Loss, parts and keys of one model's (one expert's) outputs against its queue; ``weight``: (B,) the anchors'.

    ``pretrain.patch_mode: multicrop`` replaces the distillation term by the contrastive loss of
    each crop index j, the crops ``s[:, j]`` standing as anchors whose own key is their image's
    ``k_i``: ``loss = L(z) + lambda * mean_j L(s_j)``.
    """
    use_patches = cfg.uses_pbsd
    key = out.key.float()
    signals = {}  # p(k_i | z_i), from the loss's own logits
    contrast = supcon(out.query.float(), key, labels, queue.keys, queue.labels, alpha=cfg.alpha,
                      temperature=cfg.pretrain.temperature, weight=weight, num_classes=num_classes, signals=signals)
    parts = {"contrast": contrast, **signals}
    loss = contrast
    if use_patches and cfg.pretrain.patch_mode == "multicrop":
        crops = out.student.float()
        multicrop = torch.stack([supcon(crops[:, j], key, labels, queue.keys, queue.labels, alpha=cfg.alpha,
                                        temperature=cfg.pretrain.temperature, weight=weight,
                                        num_classes=num_classes)
                                 for j in range(crops.shape[1])]).mean()
        loss = loss + cfg.pretrain.pbsd_weight * multicrop
        parts["multicrop"] = multicrop
    elif use_patches:
        args = (out.teacher.float(), out.student.float(), key, queue.keys, queue.labels)
        temperatures = {"temperature": cfg.pretrain.temperature,
                        "teacher_temperature": cfg.pretrain.pbsd_teacher_temperature}
        signals = {}  # what the teacher asks: entropies, agreement
        distill = pbsd(*args, **temperatures, signals=signals)
        loss = loss + cfg.pretrain.pbsd_weight * distill
        parts["pbsd"] = distill
        parts.update(signals)
    parts["loss"] = loss
    return loss, parts, key


def optimise(model: nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
             keys: torch.Tensor | None, labels: torch.Tensor) -> None:
    """How every stage-1 step ends: backward, the optimiser's step, then this step's keys (``None``
    for CE, which has no queue) and their labels, gathered from all ranks, into the queue."""
    if keys is not None:
        keys, labels = all_gather_cat(keys), all_gather_cat(labels.to(keys.device))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if keys is not None:
        unwrap(model).enqueue(keys, labels)


def compiled_step(net: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config, device: torch.device,
                  **loss_options) -> Callable:
    """``compile: step``: ``step(batch) -> (loss, parts)``, the eager loop's work from
    :func:`stage1_losses` (``loss_options``: its keywords) to :func:`optimise` passed whole through
    ``torch.compile`` (``mode="reduce-overhead"``, i.e. CUDA graphs, on CUDA). Build it once per
    run; one process only. Outside it stay the per-step seeding, the views and the learning rate
    (handed in as tensors: a new float would make it recompile); the finite-loss check reads the
    returned loss after the update (either way a run it stops saves nothing newer)."""

    loss_options = {name: value.to(device) if torch.is_tensor(value) else value for name, value in loss_options.items()}

    def train_step(batch):
        loss, parts, keys = stage1_losses(net, batch, cfg, device, **loss_options)
        optimise(net, optimizer, loss, keys, batch[1])
        return loss.detach(), {name: value.detach() for name, value in parts.items()}

    cuda = device.type == "cuda"
    compiled = torch.compile(train_step, mode="reduce-overhead") if cuda else torch.compile(train_step)
    lr_tensors = [torch.zeros((), device=device) for _ in optimizer.param_groups]

    def step(batch):
        rates = [group["lr"] for group in optimizer.param_groups]
        for group, rate, tensor in zip(optimizer.param_groups, rates, lr_tensors, strict=True):
            group["lr"] = tensor.fill_(rate)
        if cuda:  # a new iteration of the CUDA graphs; their outputs are overwritten by the next, hence the clones
            torch.compiler.cudagraph_mark_step_begin()
        try:
            loss, parts = compiled(batch_on(device, batch, cfg.uses_pbsd))
        finally:
            for group, rate in zip(optimizer.param_groups, rates):
                group["lr"] = rate
        if cuda:
            loss, parts = loss.clone(), {name: value.clone() for name, value in parts.items()}
        return loss, parts

    return step


def batch_on(device: torch.device, batch, patches: bool):
    """A stage-1 batch with the tensors the step reads on ``device`` (a compiled step then takes no
    host tensor, which would keep it out of CUDA graphs); the same values, the same batch on a CPU."""
    views, labels = batch
    move = functools.partial(torch.Tensor.to, device=device, non_blocking=True)
    if torch.is_tensor(views):  # ce: the images alone
        return move(views), move(labels)
    query_view, key_view, patch_views, boxes = views
    if patches:
        patch_views, boxes = move(patch_views), move(boxes)
    return (move(query_view), move(key_view), patch_views, boxes), move(labels)


class KnnMonitor:
    """Training health: cosine k-NN top-1 of the query encoder's pooled features, validation
    images against the (un-augmented) training set, every ``pretrain.knn_every`` epochs and
    after the last. Needs a validation split; never looks at the test split."""

    def __init__(self, cfg: Config, splits: DataSplits, rt: Runtime, run: RunDir):
        self.every, self.k, self.last = cfg.pretrain.knn_every, cfg.pretrain.knn_k, cfg.pretrain.epochs
        self.rt, self.loaders = rt, None
        if self.every and splits.val is None:
            run.log("k-NN health signal off: no validation split (set data.val_per_class)")
        elif self.every and rt.is_main:
            self.loaders = tuple(split_loader(cfg, ds, splits.image_size, rt.device)
                                 for ds in (splits.train, splits.val))

    def measure(self, model: nn.Module, epoch: int) -> dict:
        if self.loaders is None or (epoch % self.every and epoch != self.last):
            return {}
        encoder = model.encoder if hasattr(model, "encoder") else model.backbone
        bank, bank_labels = extract_features(encoder, self.loaders[0], device=self.rt.device, desc="k-NN train")
        features, labels = extract_features(encoder, self.loaders[1], device=self.rt.device, desc="k-NN val")
        preds = knn_predict(bank, bank_labels, features, k=self.k)
        return {"knn_top1": round(100.0 * float((preds == labels).double().mean()), 3)}


def pretrain(cfg: Config, splits: DataSplits, rt: Runtime, run: RunDir, resume: bool) -> tuple[dict, bool]:
    """Train stage 1 and save ``checkpoints/pretrain.pt``.

    Returns the final model state and whether any training happened in this call (when it did,
    a stage-2 checkpoint from before is stale).
    """
    final = run.checkpoint("pretrain")
    p = cfg.pretrain
    if resume and final.is_file():
        done = run.load(final)
        if done.get("epochs") == p.epochs:
            run.metrics = done["metrics"]
            run.write_metrics()
            return done["model"], False
    check_can_compile(cfg, rt.device, rt.world_size)
    seed_everything(mix_seed(cfg.seed, 0))  # the initial weights depend on the seed alone
    model = prepare_model(build_stage1_model(cfg, splits.num_classes).to(rt.device), cfg)
    global_batch = p.batch_size
    if global_batch % rt.world_size:
        raise ConfigError(f"pretrain.batch_size: {global_batch} is not divisible by {rt.world_size} processes")
    local_batch = global_batch // rt.world_size
    steps = steps_per_epoch(len(splits.train), global_batch, p.steps_per_epoch)
    base_lr = p.lr * global_batch / 256
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.SGD(params, lr=base_lr, momentum=p.momentum, weight_decay=p.weight_decay)
    last = LastCheckpoint(run, cfg, "pretrain", "stage 1", optimizer, model=model)
    state = last.resume() if resume else None
    start_epoch, start_step = (state["epoch"], state["step"]) if state else (0, 0)
    run.log(f"stage 1 ({cfg.method}): {len(splits.train)} images, {steps} steps/epoch, effective batch "
            f"{global_batch} = {rt.world_size} x {local_batch}, lr {base_lr:g} (= {p.lr:g} x {global_batch}/256)")
    if cfg.method_spec.contrastive and p.queue_size > len(splits.train):
        run.log(f"warning: pretrain.queue_size {p.queue_size} exceeds the {len(splits.train)} training images: "
                f"the queue then holds stale keys of the anchor's own image, which count as its positives")
    health = KnnMonitor(cfg, splits, rt, run)
    options = {"class_weight": anchor_weights(cfg, splits.train_counts), "num_classes": splits.num_classes,
               "log_pi": loss_priors(cfg, splits.train_counts)}  # of stage1_losses
    net = DistributedDataParallel(model) if rt.distributed else model
    batches = EpochBatches(cfg, splits.train, lambda on_device: stage1_transform(cfg, splits.image_size, on_device),
                           rt, batch=local_batch, seed=cfg.seed)
    run.log(batches.describe())
    compiled = compiled_step(net, optimizer, cfg, rt.device, **options) if cfg.compile == "step" else None
    total_steps, warmup = p.epochs * steps, p.warmup_epochs * steps
    for epoch in range(start_epoch, p.epochs):
        order = shuffled_order(len(splits.train), cfg.seed, epoch, rt, steps, local_batch)
        loader = batches.epoch(order, epoch, start_step)
        net.train()
        meter = EpochMeter()
        bar = progress(loader, desc=f"pretrain {epoch + 1}/{p.epochs}", initial=start_step, total=steps,
                   enabled=rt.is_main, leave=False)
        check = FiniteCheck(rt.device, start_step, f"the last good checkpoint is {last.path}")
        for step, batch in enumerate(bar, start=start_step):
            torch.manual_seed(mix_seed(cfg.seed, epoch, step, rt.rank, 3))  # key shuffle etc.
            lr = warmup_cosine(base_lr, epoch * steps + step, total_steps, warmup)
            set_lr(optimizer, lr)
            if compiled is None:
                loss, parts, keys = stage1_losses(net, batch, cfg, rt.device, **options)
            else:  # compile: step: the whole step, optimiser's step and enqueue included
                loss, parts = compiled(batch)
            save_due = last.due(step, steps)
            if check.add(loss, f"stage 1, epoch {epoch + 1}", step, steps, now=save_due):
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.3g}")
            if compiled is None:
                optimise(net, optimizer, loss, keys, batch[1])
            meter.add(parts)
            run.add_step_scalars(epoch * steps + step, {"lr": lr, **parts})  # TensorBoard, if logging.tensorboard
            if save_due:
                last.save(epoch, step + 1)
        run.add_metrics(meter.row("pretrain", epoch + 1, lr, local_batch) | health.measure(unwrap(net), epoch + 1))
        start_step = 0
        last.save(epoch + 1, 0)
    if rt.is_main:
        run.save(final, {"stage": "pretrain", "model": model.state_dict(), "epochs": p.epochs,
                         "metrics": run.metrics, "complete": True})
    return model.state_dict(), True
