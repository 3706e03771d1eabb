"""The engine's side of ``model.experts > 1`` (docs/RECIPES.md, "Multi-expert backbone").

Stage 1: :func:`dscl.engine.pretrain.build_stage1_model` builds the multi-expert kind of the
momentum-contrast model (:class:`dscl.models.MultiExpertContrast`), which runs once for all
experts; each expert's outputs go through the single-model loss with that expert's queue, and
:func:`mean_over_experts` makes the batch's loss. Stage 2 trains one linear layer per expert (the
sum of their cross-entropies, so each layer gets the gradient it would get alone); evaluation adds
each expert's accuracy. With ``model.experts: 1`` the single-model code runs as it did.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import ExpertClassifier
from .evaluate import _outputs, accuracy_report


def mean_over_experts(per_expert: list[tuple[Tensor, dict, Tensor]]) -> tuple[Tensor, dict, Tensor]:
    """A batch's (loss, parts, keys) from each expert's: the mean loss; each part's mean over experts,
    plus ``loss_e<k>`` per expert; the keys (B, E, D), as :class:`~dscl.models.experts.ExpertQueues` takes them."""
    loss = torch.stack([expert_loss for expert_loss, _, _ in per_expert]).mean()
    parts = {name: torch.stack([p[name] for _, p, _ in per_expert]).mean()
             for name in per_expert[0][1] if name != "loss"}
    parts["loss"] = loss
    parts.update({f"loss_e{e}": expert_loss.detach() for e, (expert_loss, _, _) in enumerate(per_expert)})
    return loss, parts, torch.stack([keys for _, _, keys in per_expert], 1)


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
