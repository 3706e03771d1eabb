"""Top-1 accuracy overall and by Many / Medium / Few shot group (SPEC section 6)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm import tqdm

from ..data import shot_groups


@torch.no_grad()
def predict(model: nn.Module, loader, *, device: torch.device, progress: bool = True,
            desc: str = "eval") -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted and true labels of every (images, labels) batch of ``loader``, model in eval mode."""
    was_training = model.training
    model.eval()
    preds, labels = [], []
    for images, targets in tqdm(loader, desc=desc, leave=False, disable=not progress):
        preds.append(model(images.to(device, non_blocking=True)).argmax(1).cpu())
        labels.append(torch.as_tensor(targets).cpu())
    model.train(was_training)
    return torch.cat(preds), torch.cat(labels)


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
