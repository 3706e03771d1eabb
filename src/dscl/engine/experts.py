"""The engine's side of ``model.experts > 1`` (docs/RECIPES.md, "Multi-expert backbone").

Stage 1 (:func:`per_expert`): the network runs once for all experts
(:class:`dscl.models.MultiExpertContrast`), then each expert's outputs go through exactly the
single-model loss of :func:`dscl.engine.pretrain.stage1_losses` with that expert's queue; the
batch loss is the mean over experts. Stage 2 trains one linear layer per expert (the sum of
their cross-entropies, so each layer gets the gradient it would get alone); evaluation adds each
expert's accuracy. With ``model.experts: 1`` the single-model code runs as it did.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ..config import Config
from ..models import ExpertClassifier, MultiExpertContrast, build_backbone, build_multi_expert_backbone
from ..models.momentum import ContrastOutput
from .evaluate import _outputs, accuracy_report
from .step import autocast, to_device, unwrap


def build_encoder(cfg: Config, *, pretrained: str | None = None, zero_init_residual: bool = True) -> nn.Module:
    """The backbone of ``model.backbone``, multi-expert when ``model.experts > 1``."""
    if cfg.model.experts == 1:
        return build_backbone(cfg.model.backbone, pretrained=pretrained, zero_init_residual=zero_init_residual)
    return build_multi_expert_backbone(cfg.model.backbone, cfg.model.experts, width=cfg.model.expert_width,
                                       pretrained=pretrained, zero_init_residual=zero_init_residual)


def build_expert_stage1_model(cfg: Config, num_classes: int) -> MultiExpertContrast:
    """:func:`dscl.engine.pretrain.build_stage1_model` for ``model.experts > 1``."""
    backbone = build_encoder(cfg, pretrained=cfg.model.pretrained, zero_init_residual=cfg.model.pretrained is None)
    if cfg.model.train_last_stage_only:
        backbone.freeze_early_stages()
    p = cfg.pretrain
    return MultiExpertContrast(backbone, feature_dim=cfg.model.feature_dim, queue_size=p.queue_size,
                               momentum=p.ema_momentum, key_bn_groups=p.key_bn_groups, patch_bn_stats=p.patch_bn_stats,
                               num_classes=num_classes if p.queue_sampling == "balanced" else None,
                               teacher=None if p.patch_mode == "multicrop" else p.pbsd_teacher)


class _OneExpert:
    """Stands in for the model in ``stage1_losses``: returns expert e's outputs, already computed
    with every other expert's, and holds expert e's queue."""

    def __init__(self, out: ContrastOutput, queue):
        self.out, self.queue = out, queue

    def __call__(self, *views) -> ContrastOutput:
        return self.out


def per_expert(stage1_losses):
    """Decorates :func:`dscl.engine.pretrain.stage1_losses`: a :class:`MultiExpertContrast` (bare or in
    DDP) runs once for all experts, then each expert's outputs go through the undecorated loss with
    that expert's queue (same keywords); any other model goes straight through."""

    @functools.wraps(stage1_losses)
    def losses(model: nn.Module, batch, cfg: Config, device: torch.device, **options) -> tuple[Tensor, dict, Tensor]:
        if not isinstance(model.module if isinstance(model, DistributedDataParallel) else model, MultiExpertContrast):
            return stage1_losses(model, batch, cfg, device, **options)
        return _expert_losses(stage1_losses, model, batch, cfg, device, options)

    return losses


def _expert_losses(stage1_losses, net: nn.Module, batch, cfg: Config, device: torch.device,
                   options: dict) -> tuple[Tensor, dict, Tensor]:
    """The mean over experts of each expert's loss. Parts are means over experts, plus
    ``loss_e<k>`` per expert; the keys are (B, E, D) for :class:`~dscl.models.experts.ExpertQueues`."""

    (query_view, key_view, patches, boxes), labels = batch
    use_patches = cfg.uses_pbsd
    views = (to_device(query_view, device, cfg), to_device(key_view, device, cfg),
             to_device(patches, device, cfg) if use_patches else None, boxes.to(device) if use_patches else None)
    with autocast(cfg, device):
        outs = net(*views)
    queues = unwrap(net).queue
    on_device = (views, labels.to(device, non_blocking=True))  # moved once, not once per expert
    per_expert = [stage1_losses(_OneExpert(out, queues[e]), on_device, cfg, device, **options)
                  for e, out in enumerate(outs)]
    loss = torch.stack([expert_loss for expert_loss, _, _ in per_expert]).mean()
    parts = {name: torch.stack([p[name] for _, p, _ in per_expert]).mean()
             for name in per_expert[0][1] if name != "loss"}
    parts["loss"] = loss
    parts.update({f"loss_e{e}": expert_loss.detach() for e, (expert_loss, _, _) in enumerate(per_expert)})
    return loss, parts, torch.stack([keys for _, _, keys in per_expert], 1)  # keys (B, E, D)


def classifier_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Stage 2's cross-entropy: of (N, C) logits, or summed over the experts of (N, E, C) logits."""
    if logits.ndim == 2:
        return F.cross_entropy(logits, labels)
    return sum(F.cross_entropy(logits[:, e], labels) for e in range(logits.shape[1]))


class _ExpertPredictions(nn.Module):
    """(N, 3, S, S) images -> (N, E): the class each expert of an ExpertClassifier predicts."""

    def __init__(self, model: ExpertClassifier):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.expert_logits(self.model.backbone(x)).argmax(2)


def expert_results(model: ExpertClassifier, loader, train_counts, device: torch.device) -> list[dict]:
    """Overall / Many / Medium / Few / per-class top-1 of each expert alone (its own linear layer)."""
    preds, labels = _outputs(_ExpertPredictions(model), loader, device, lambda p: p, False, "experts")
    results = []
    for e in range(preds.shape[1]):
        report = accuracy_report(preds[:, e], labels, train_counts)
        results.append({k: report[k] for k in ("overall", "many", "medium", "few", "per_class")})
    return results
