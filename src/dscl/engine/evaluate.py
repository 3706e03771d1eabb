"""Top-1 accuracy overall and by Many / Medium / Few shot group (Many > 100, Medium 20-100, Few < 20
training images), k-NN, and the post-hoc logit adjustment of a trained classifier (Menon et al. 2021)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data import shot_groups
from ..progress import progress as progress_bar
from ..losses import log_prior, posthoc_adjust


@torch.no_grad()
def _outputs(module: nn.Module, loader, device: torch.device, post, progress: bool, desc: str):
    """``post(module(images))`` of every (images, labels) batch, in eval mode, and the labels."""
    was_training = module.training
    module.eval()
    outputs, labels = [], []
    for images, targets in progress_bar(loader, desc=desc, leave=False, enabled=progress):
        outputs.append(post(module(images.to(device, non_blocking=True))).cpu())
        labels.append(torch.as_tensor(targets).cpu())
    module.train(was_training)
    return torch.cat(outputs), torch.cat(labels)


def predict(model: nn.Module, loader, *, device: torch.device, progress: bool = True,
            desc: str = "eval") -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted and true labels of every (images, labels) batch of ``loader``, model in eval mode."""
    return _outputs(model, loader, device, lambda logits: logits.argmax(1), progress, desc)


def predict_logits(model: nn.Module, loader, *, device: torch.device, progress: bool = True,
                   desc: str = "eval") -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) float logits and (N,) true labels of every batch of ``loader``, model in eval mode."""
    return _outputs(model, loader, device, lambda logits: logits.float(), progress, desc)


def extract_features(backbone: nn.Module, loader, *, device: torch.device, progress: bool = False,
                     desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled backbone features (N, d) and labels (N,) of every batch of ``loader``, in eval mode."""
    return _outputs(backbone, loader, device, lambda features: features.float(), progress, desc)


def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, features: torch.Tensor,
                k: int = 20, chunk: int = 1024) -> torch.Tensor:
    """Cosine k-NN: each row of ``features`` takes the class whose members among its ``k`` most
    similar training rows have the largest summed similarity. Returns (N,) predicted labels."""
    bank = F.normalize(train_features.float(), dim=1)  # (M, d)
    num_classes = int(train_labels.max()) + 1
    k = min(k, bank.shape[0])
    preds = []
    for start in range(0, features.shape[0], chunk):
        sims = F.normalize(features[start : start + chunk].float(), dim=1) @ bank.T  # (n, M)
        top, index = sims.topk(k, dim=1)  # (n, k)
        votes = torch.zeros(sims.shape[0], num_classes).scatter_add_(1, train_labels[index], top)
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def accuracy_report(preds: torch.Tensor, labels: torch.Tensor, train_counts: Sequence[int]) -> dict:
    """Overall top-1, per-class top-1 and the mean per-class top-1 of each shot group, in percent.

    Groups are by the number of TRAINING images of a class: many > 100, medium 20..100,
    few < 20. A group without classes (or without test images) is reported as None.
    """
    num_classes = len(train_counts)
    correct = torch.bincount(labels[preds == labels], minlength=num_classes).double()
    total = torch.bincount(labels, minlength=num_classes).double()
    per_class = [100.0 * float(c / t) if t > 0 else None for c, t in zip(correct, total)]
    groups = shot_groups(train_counts)
    report = {"overall": 100.0 * float((preds == labels).double().mean()) if len(labels) else None}
    for group in ("many", "medium", "few"):
        values = [a for a, g in zip(per_class, groups) if g == group and a is not None]
        report[group] = sum(values) / len(values) if values else None
    report["per_class"] = per_class
    return report


TAU_GRID = tuple(0.25 * i for i in range(9))  # 0, 0.25, ..., 2; 1 is Bayes-optimal for a balanced test set


def posthoc_logit_adjustment(val: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                             train_counts: Sequence[int], taus: Sequence[float] = TAU_GRID) -> dict:
    """Post-hoc logit adjustment (Menon et al. 2021) of a trained classifier: predict
    ``argmax_y f_y(x) - tau * log pi_y``, tau chosen on the validation split (the smallest of the
    best), then the test split's report at that tau. ``val`` / ``test``: (logits (N, C), labels)."""
    log_pi = log_prior(train_counts)
    by_tau = {tau: accuracy_report(posthoc_adjust(val[0], log_pi, tau).argmax(1), val[1], train_counts)["overall"]
              for tau in taus}
    tau = max(by_tau, key=lambda t: (by_tau[t], -t))
    report = accuracy_report(posthoc_adjust(test[0], log_pi, tau).argmax(1), test[1], train_counts)
    return {"tau": tau, "val_top1": by_tau[tau], **report, "val_top1_by_tau": {f"{t:g}": v for t, v in by_tau.items()}}
