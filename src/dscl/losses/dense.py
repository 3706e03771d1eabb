"""Straightforward dense forms of both losses, as the authors' code builds them.

Every candidate is concatenated into one (B, 2B + K) logit matrix and positives are picked with
batch-by-queue boolean masks. Same values as :mod:`.decoupled_supcon` and
:mod:`.patch_distillation`; kept so that ``dscl bench --reference`` measures what the
factorised forms save, and as a second implementation to compare against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .decoupled_supcon import valid_queue


def dense_decoupled_supcon_loss(query: Tensor, key: Tensor, labels: Tensor, queue: Tensor, queue_labels: Tensor,
                                alpha: float | None = 0.1, temperature: float = 0.07,
                                weight: Tensor | None = None, num_classes: int | None = None,
                                signals: dict | None = None) -> Tensor:
    batch = query.shape[0]  # num_classes: accepted for the optimised form's signature, not needed
    queue, queue_labels = valid_queue(queue, queue_labels)
    candidates = torch.cat([query, key, queue])  # (2B + K, D)
    cand_labels = torch.cat([labels, labels, queue_labels])  # (2B + K,)
    logits = query @ candidates.T / temperature  # (B, 2B + K)
    eye = torch.eye(batch, dtype=torch.bool, device=query.device)
    not_self = torch.cat([~eye, torch.ones(batch, batch + queue.shape[0], dtype=torch.bool, device=query.device)], 1)
    own_key = torch.cat([torch.zeros_like(eye), eye, torch.zeros(batch, queue.shape[0], dtype=torch.bool,
                                                                 device=query.device)], 1)
    same = (labels[:, None] == cand_labels[None, :]) & not_self & ~own_key  # (B, 2B + K) mask of P_i
    log_p = logits - torch.logsumexp(logits.masked_fill(~not_self, float("-inf")), 1, keepdim=True)
    num_pos = same.sum(1).to(query.dtype)
    log_p_key = (log_p * own_key).sum(1)
    if signals is not None:  # as decoupled_supcon_loss(signals=) gives it
        signals["p_key"] = log_p_key.detach().exp().mean()
    sum_pos = (log_p * same).sum(1)
    if alpha is None:
        loss = -(log_p_key + sum_pos) / (num_pos + 1)
    else:
        loss = torch.where(num_pos > 0, -(alpha * log_p_key + (1 - alpha) * sum_pos / num_pos.clamp(min=1)), -log_p_key)
    return loss.mean() if weight is None else (weight * loss).mean()


def dense_patch_distillation_loss(teacher: Tensor, student: Tensor, key: Tensor, queue: Tensor, queue_labels: Tensor,
                                  temperature: float = 0.07, teacher_temperature: float | None = None,
                                  signals: dict | None = None) -> Tensor:
    queue, _ = valid_queue(queue, queue_labels)
    d = student.shape[2]

    def logits(features: Tensor, t: float) -> Tensor:  # (B*L, 1 + K), the own key's logit first
        own = (features * key[:, None, :]).sum(-1).reshape(-1, 1)
        return torch.cat([own, features.reshape(-1, d) @ queue.T], 1) / t

    log_t = torch.log_softmax(logits(teacher.detach(), teacher_temperature or temperature), 1)
    log_s = torch.log_softmax(logits(student, temperature), 1)
    t = log_t.exp()
    if signals is not None:  # the health signals, as patch_distillation_loss(signals=) gives them
        with torch.no_grad():
            signals.update({"pbsd_teacher_entropy": -(t * log_t).sum(1).mean(),
                            "pbsd_student_entropy": -(log_s.exp() * log_s).sum(1).mean(),
                            "pbsd_teacher_own": t[:, 0].mean(),
                            "pbsd_agreement": (log_t.argmax(1) == log_s.argmax(1)).float().mean()})
    return -(t * log_s).sum(1).mean()
