"""Patch-based self distillation (PBSD, Eq. 12 and 14).

For patch j of anchor i the candidates are the anchor's own key ``k_i`` and the valid queue
entries (not the other batch entries). The teacher distribution comes from the ROI-pooled patch
feature ``c_i[j]``, the student from the feature of the cropped patch ``s_i[j]``::

    t = softmax([c . k_i, c . M] / tau)         (no gradient)
    loss = mean_{i,j} -sum(t * log_softmax([s . k_i, s . M] / tau))

Written as ``logsumexp(student) - sum(t * student_logits)`` with the own-key column kept apart
from the (B*L, K) queue block, so nothing of queue size is concatenated; empty queue slots get a
logit whose exp() is 0, so no step waits for the device to count them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .decoupled_supcon import EMPTY_LOGIT


def patch_distillation_loss(
    teacher: Tensor,
    student: Tensor,
    key: Tensor,
    queue: Tensor,
    queue_labels: Tensor,
    temperature: float = 0.07,
) -> Tensor:
    """Mean PBSD loss over every patch of every anchor.

    teacher: (B, L, D) normalised ROI patch features ``c`` (treated as constants).
    student: (B, L, D) normalised features of the patch crops ``s``.
    key: (B, D) normalised keys ``k``; queue: (K, D); queue_labels: (K,), -1 marks empty slots.
    """
    if teacher.shape != student.shape or teacher.ndim != 3:
        raise ValueError("teacher and student must both be (B, L, D), "
                         f"got {tuple(teacher.shape)} and {tuple(student.shape)}")
    if key.shape != (teacher.shape[0], teacher.shape[2]):
        raise ValueError(f"key must be (B, D) = {(teacher.shape[0], teacher.shape[2])}, got {tuple(key.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dim = student.shape[2]
    scaled_queue = queue.T / temperature  # (D, K)
    empty = queue_labels < 0  # (K,): slots never filled take part in nothing

    def logits(features: Tensor) -> tuple[Tensor, Tensor]:  # own key (B*L,), queue (B*L, K)
        own = (features * key[:, None, :]).sum(-1).reshape(-1) / temperature
        return own, (features.reshape(-1, dim) @ scaled_queue).masked_fill_(empty, EMPTY_LOGIT)

    with torch.no_grad():
        own_t, queue_t = logits(teacher.detach())
        log_norm = torch.logaddexp(own_t, torch.logsumexp(queue_t, 1))  # (B*L,)
        weight_own = torch.exp(own_t - log_norm)
        weight_queue = torch.exp(queue_t.sub_(log_norm[:, None]))  # teacher probabilities, in place
    own_s, queue_s = logits(student)
    log_z = torch.logaddexp(own_s, torch.logsumexp(queue_s, 1))
    cross = weight_own * own_s + (weight_queue * queue_s).sum(1)  # sum_m t_m * student logit_m
    return (log_z - cross).mean()


class PatchDistillationLoss(nn.Module):
    """Module form of :func:`patch_distillation_loss`."""

    def __init__(self, temperature: float = 0.07):
        super().__init__()
        self.temperature = temperature

    def forward(self, teacher: Tensor, student: Tensor, key: Tensor, queue: Tensor, queue_labels: Tensor) -> Tensor:
        return patch_distillation_loss(teacher, student, key, queue, queue_labels, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
