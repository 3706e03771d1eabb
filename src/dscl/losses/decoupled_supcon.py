"""Decoupled supervised contrastive loss (DSCL, Eq. 8-9) and its SCL special case (Eq. 1).

For anchor ``z_i`` the candidate set ``A_i`` holds the other queries of the batch, every key of
the batch (including its own augmentation ``k_i``) and the valid queue entries. ``P_i`` is the
set of candidates other than ``k_i`` with the anchor's label. With
``log p(a | z_i) = z_i . a / tau - logsumexp_{a' in A_i}(z_i . a' / tau)``::

    DSCL:  loss_i = -[alpha * log p(k_i|z_i) + (1 - alpha) / |P_i| * sum_{a in P_i} log p(a|z_i)]
    SCL:   loss_i = -1 / (|P_i| + 1) * [log p(k_i|z_i) + sum_{a in P_i} log p(a|z_i)]
    |P_i| = 0:  loss_i = -log p(k_i|z_i)

The implementation never builds a batch-by-queue mask. Because ``sum_{a in P_i} log p(a|z_i)
= z_i . (sum_{a in P_i} a) / tau - |P_i| logZ_i``, the positive term needs only the per-class
sums of the candidate features; the normaliser ``logZ_i`` is one matrix product per candidate
block followed by a log-sum-exp. Cost and memory grow with the queue only through that product.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def effective_number_weights(counts: Tensor, beta: float = 0.9999) -> Tensor:
    """Class-balanced weights of Cui et al. (2019): ``w_c = (1 - beta) / (1 - beta ** n_c)``,
    scaled so that they sum to the number of classes. counts: (C,) training images per class."""
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must lie in [0, 1), got {beta}")
    counts = torch.as_tensor(counts, dtype=torch.float64)
    if bool((counts < 1).any()):
        raise ValueError("every class needs at least one training image")
    weights = (1.0 - beta) / (1.0 - beta**counts)
    return (weights * len(counts) / weights.sum()).float()


def alpha_from_beta(beta: float) -> float:
    """The authors' parameterisation: weight 1 on ``k_i`` and ``beta / |P_i|`` on each member
    of ``P_i``, normalised by their sum, is DSCL with ``alpha = 1 / (1 + beta)``."""
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    return 1.0 / (1.0 + beta)


def valid_queue(queue: Tensor, queue_labels: Tensor) -> tuple[Tensor, Tensor]:
    """Drop the slots marked empty (label -1). Returns the queue itself when it is full."""
    if queue_labels.numel() == 0 or bool((queue_labels >= 0).all()):
        return queue, queue_labels
    keep = queue_labels >= 0
    return queue[keep], queue_labels[keep]


# Logit of an empty queue slot: exp() of it is exactly 0 next to any real logit, and unlike -inf it
# keeps a row of empty slots finite (its log-sum-exp and gradient), and 0 * it is 0.
EMPTY_LOGIT = -1e30


def _class_sums(features: Tensor, labels: Tensor, num_classes: int,
                valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-class sum of feature rows and per-class counts: (C, D), (C,); rows where ``valid`` is
    False count nowhere. Index-adds with a static size, so nothing waits for the device."""
    if valid is None:
        weights = torch.ones_like(labels, dtype=features.dtype)
    else:
        weights = valid.to(features.dtype)
        labels, features = labels.clamp(min=0), features * weights[:, None]
    sums = features.new_zeros(num_classes, features.shape[1]).index_add_(0, labels, features)
    counts = features.new_zeros(num_classes).index_add_(0, labels, weights)
    return sums, counts


def decoupled_supcon_loss(
    query: Tensor,
    key: Tensor,
    labels: Tensor,
    queue: Tensor,
    queue_labels: Tensor,
    alpha: float | None = 0.1,
    temperature: float = 0.07,
    weight: Tensor | None = None,
    num_classes: int | None = None,
    signals: dict | None = None,
) -> Tensor:
    """Mean DSCL loss over the B anchors of a batch (SCL when ``alpha`` is None); with
    ``weight`` (B,), the mean of ``weight[i] * loss_i`` (per-anchor re-weighting).

    query: (B, D) L2-normalised anchors ``z``, carry gradient (also as candidates).
    key: (B, D) L2-normalised keys ``k``.
    labels: (B,) int64 class of each row of ``query`` and ``key``.
    queue: (K, D) stored keys; queue_labels: (K,) with -1 for a slot never filled.
    num_classes: more than the largest label; given, no step of the loss waits for the device
    (else it is read from the labels).
    signals: given, receives ``p_key``, :func:`key_probability` from this loss's own logits (no
    second pass over the queue).

    Keys and queue are used as given: in training they come from the momentum encoder and
    carry no gradient, as in the method; the other queries of the batch carry theirs.
    """
    if query.ndim != 2 or query.shape != key.shape:
        raise ValueError(f"query and key must both be (B, D), got {tuple(query.shape)} and {tuple(key.shape)}")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    labels = labels.long()
    queue_labels = queue_labels.long()
    filled = queue_labels >= 0  # (K,): empty slots take part in nothing

    scaled = query / temperature  # (B, D): every logit below is already divided by tau
    log_p_key, log_z = _log_p_key(scaled, query, key, queue, filled)  # (B,), (B,)
    if signals is not None:
        signals["p_key"] = log_p_key.detach().exp().mean()

    # Sum of P_i's features: same-label keys, queries and queue entries, minus k_i and z_i.
    if num_classes is None:
        num_classes = int(torch.cat([labels, queue_labels]).max()) + 1
    key_sums, counts = _class_sums(torch.cat([key, queue]), torch.cat([labels, queue_labels]), num_classes,
                                   torch.cat([torch.ones_like(labels, dtype=torch.bool), filled]))
    query_sums, query_counts = _class_sums(query, labels, num_classes)
    positive_sum = key_sums[labels] - key + query_sums[labels] - query  # (B, D)
    num_positive = (counts[labels] - 1 + query_counts[labels] - 1).to(query.dtype)  # |P_i|
    sum_log_p_positive = (scaled * positive_sum).sum(1) - num_positive * log_z  # (B,)

    has_positive = num_positive > 0
    safe_count = num_positive.clamp(min=1)
    if alpha is None:  # SCL: weight 1 / (|P_i| + 1) on k_i and on every member of P_i
        loss = -(log_p_key + sum_log_p_positive) / (num_positive + 1)
    else:
        decoupled = -(alpha * log_p_key + (1.0 - alpha) * sum_log_p_positive / safe_count)
        loss = torch.where(has_positive, decoupled, -log_p_key)
    return loss.mean() if weight is None else (weight.to(loss.dtype) * loss).mean()


def _log_p_key(scaled: Tensor, query: Tensor, key: Tensor, queue: Tensor, filled: Tensor) -> tuple[Tensor, Tensor]:
    """log p(k_i | z_i) and the normaliser log Z_i over A_i = {z_b, b != i} + {k_b} + the filled
    queue slots (``filled``: (K,) bool), one log-sum-exp per block. ``scaled`` is query / tau."""
    self_mask = torch.eye(query.shape[0], dtype=torch.bool, device=query.device)
    logits_qq = (scaled @ query.T).masked_fill(self_mask, float("-inf"))  # (B, B)
    logits_qk = scaled @ key.T  # (B, B)
    blocks = [torch.logsumexp(logits_qq, 1), torch.logsumexp(logits_qk, 1)]
    if queue.shape[0] > 0:
        logits_queue = (scaled @ queue.T).masked_fill(~filled, EMPTY_LOGIT)  # (B, K)
        blocks.append(torch.logsumexp(logits_queue, 1))  # (B,)
    log_z = torch.logsumexp(torch.stack(blocks, 1), 1)  # (B,)
    return logits_qk.diagonal() - log_z, log_z  # z_i . k_i / tau - log Z_i


@torch.no_grad()
def key_probability(query: Tensor, key: Tensor, queue: Tensor, queue_labels: Tensor,
                    temperature: float = 0.07) -> Tensor:
    """Mean over anchors of p(k_i | z_i), the probability the loss gives each anchor's own key
    among all its candidates: a training-health signal (chance is 1 / |A_i|; DSCL's optimum
    puts it at alpha)."""
    return _log_p_key(query / temperature, query, key, queue, queue_labels >= 0)[0].exp().mean()


class DecoupledSupConLoss(nn.Module):
    """Module form of :func:`decoupled_supcon_loss`.

    Give ``alpha`` (the paper, default 0.1), or ``beta`` (the authors' code, alpha = 1/(1+beta)),
    or ``alpha=None`` for the SCL baseline.
    """

    def __init__(self, alpha: float | None = 0.1, temperature: float = 0.07, beta: float | None = None):
        super().__init__()
        if beta is not None:
            alpha = alpha_from_beta(beta)
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        self.alpha = alpha
        self.temperature = temperature

    def forward(self, query: Tensor, key: Tensor, labels: Tensor, queue: Tensor, queue_labels: Tensor,
                weight: Tensor | None = None) -> Tensor:
        return decoupled_supcon_loss(query, key, labels, queue, queue_labels, self.alpha, self.temperature, weight)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, temperature={self.temperature}"
