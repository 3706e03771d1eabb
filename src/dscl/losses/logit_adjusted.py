"""Logit adjustment (Menon et al., ICLR 2021): the long-tail baselines built on class priors.

- Loss: cross-entropy on ``f_y(x) + tau * log pi_y``; predict with ``f`` alone. At tau = 1
  this is Balanced Softmax (Ren et al., NeurIPS 2020).
- Post-hoc: predict ``argmax_y f_y(x) - tau * log pi_y`` with any trained classifier.

``pi`` is the class frequency of the training split; tau = 1 is the Bayes-optimal choice for a
balanced test set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def log_prior(counts) -> Tensor:
    """(C,) ``log pi_c`` from (C,) training images per class; every class needs one image."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    if bool((counts < 1).any()):
        raise ValueError("every class needs at least one training image")
    return (counts / counts.sum()).log().float()


def logit_adjusted_loss(logits: Tensor, labels: Tensor, log_pi: Tensor, tau: float = 1.0) -> Tensor:
    """Mean cross-entropy of ``logits + tau * log_pi``.

    Args:
        logits: (B, C) classifier outputs.
        labels: (B,) class indices.
        log_pi: (C,) log class priors, see :func:`log_prior`.
        tau: strength of the adjustment; 0 is plain cross-entropy.
    """
    return F.cross_entropy(logits + tau * log_pi.to(logits), labels)


def posthoc_adjust(logits: Tensor, log_pi: Tensor, tau: float) -> Tensor:
    """(B, C) ``logits - tau * log_pi``: the scores whose argmax is the post-hoc adjusted prediction."""
    return logits - tau * log_pi.to(logits)


class LogitAdjustedLoss(nn.Module):
    """Module form of :func:`logit_adjusted_loss` with the class counts fixed at construction."""

    def __init__(self, counts, tau: float = 1.0) -> None:
        super().__init__()
        if tau < 0:
            raise ValueError(f"tau must be >= 0, got {tau}")
        self.tau = tau
        self.register_buffer("log_pi", log_prior(counts))

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return logit_adjusted_loss(logits, labels, self.log_pi, self.tau)
