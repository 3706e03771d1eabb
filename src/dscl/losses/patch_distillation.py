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


def _check(teacher: Tensor, student: Tensor, key: Tensor, *temperatures: float) -> None:
    if teacher.shape != student.shape or teacher.ndim != 3:
        raise ValueError("teacher and student must both be (B, L, D), "
                         f"got {tuple(teacher.shape)} and {tuple(student.shape)}")
    if key.shape != (teacher.shape[0], teacher.shape[2]):
        raise ValueError(f"key must be (B, D) = {(teacher.shape[0], teacher.shape[2])}, got {tuple(key.shape)}")
    if any(t <= 0 for t in temperatures):
        raise ValueError(f"temperatures must be > 0, got {temperatures}")


def _logits(features: Tensor, key: Tensor, queue: Tensor, queue_labels: Tensor,
            temperature: float) -> tuple[Tensor, Tensor]:
    """(B, L, D) features -> own-key logits (B*L,) and queue logits (B*L, K), empty slots masked."""
    own = (features * key[:, None, :]).sum(-1).reshape(-1) / temperature
    scores = features.reshape(-1, features.shape[2]) @ (queue.T / temperature)
    return own, scores.masked_fill_(queue_labels < 0, EMPTY_LOGIT)


def patch_distillation_loss(
    teacher: Tensor,
    student: Tensor,
    key: Tensor,
    queue: Tensor,
    queue_labels: Tensor,
    temperature: float = 0.07,
    teacher_temperature: float | None = None,
    signals: dict | None = None,
) -> Tensor:
    """Mean PBSD loss over every patch of every anchor.

    teacher: (B, L, D) normalised ROI patch features ``c`` (treated as constants).
    student: (B, L, D) normalised features of the patch crops ``s``.
    key: (B, D) normalised keys ``k``; queue: (K, D); queue_labels: (K,), -1 marks empty slots.
    teacher_temperature: the teacher's softmax temperature; None: ``temperature`` (the paper's).
    A lower one sharpens the teacher, as DINO-style distillation does.
    signals: a dict, when given, receives :func:`distillation_signals` of this batch, made from
    the logits the loss computed anyway.
    """
    t_teacher = temperature if teacher_temperature is None else teacher_temperature
    _check(teacher, student, key, temperature, t_teacher)
    with torch.no_grad():
        own_t, queue_t = _logits(teacher.detach(), key, queue, queue_labels, t_teacher)
        log_norm = torch.logaddexp(own_t, torch.logsumexp(queue_t, 1))  # (B*L,)
        weight_own = torch.exp(own_t - log_norm)
        weight_queue = torch.exp(queue_t.sub_(log_norm[:, None]))  # teacher probabilities, in place
    own_s, queue_s = _logits(student, key, queue, queue_labels, temperature)
    log_z = torch.logaddexp(own_s, torch.logsumexp(queue_s, 1))
    cross = weight_own * own_s + (weight_queue * queue_s).sum(1)  # sum_m t_m * student logit_m
    if signals is not None:
        signals.update(_signals(own_t - log_norm, queue_t, weight_own, weight_queue, own_s, queue_s, log_z))
    return (log_z - cross).mean()


@torch.no_grad()
def _signals(own_t: Tensor, queue_t: Tensor, p_own_t: Tensor, p_queue_t: Tensor, own_s: Tensor, queue_s: Tensor,
             log_z: Tensor) -> dict[str, Tensor]:
    """The signals from the teacher's log-probabilities and probabilities (own (N,), queue (N, K))
    and the student's logits with their log-normaliser (N,)."""
    own_s, queue_s = own_s - log_z, queue_s - log_z[:, None]  # the student's log-probabilities
    entropy_t = -(p_own_t * own_t + (p_queue_t * queue_t).sum(1))  # empty slots: 0 * (-1e30) = 0
    entropy_s = -(own_s.exp() * own_s + (queue_s.exp() * queue_s).sum(1))
    return {"pbsd_teacher_entropy": entropy_t.mean(), "pbsd_student_entropy": entropy_s.mean(),
            "pbsd_teacher_own": p_own_t.mean(),
            "pbsd_agreement": (_most_likely(own_t, queue_t) == _most_likely(own_s, queue_s)).float().mean()}


def _most_likely(own: Tensor, queue: Tensor) -> Tensor:
    """(N,) index of the largest of [own; queue] per row: 0 for the own key (first, so it wins a tie)."""
    return torch.cat([own[:, None], queue], 1).argmax(1)


def distillation_signals(teacher: Tensor, student: Tensor, key: Tensor, queue: Tensor, queue_labels: Tensor,
                         temperature: float = 0.07, teacher_temperature: float | None = None) -> dict[str, Tensor]:
    """What PBSD asks of the student, per batch (means over every patch):

    - ``pbsd_teacher_entropy`` / ``pbsd_student_entropy``: entropy (nats) of the teacher's and
      the student's distribution over [own key; valid queue]; log(1 + K) is uniform;
    - ``pbsd_teacher_own``: the teacher's probability on the anchor's own key;
    - ``pbsd_agreement``: how often the student's most likely candidate is the teacher's.

    The training step has them from :func:`patch_distillation_loss` (``signals=``) at no extra matmul.
    """
    signals = {}
    with torch.no_grad():
        patch_distillation_loss(teacher, student, key, queue, queue_labels, temperature, teacher_temperature, signals)
    return signals


class PatchDistillationLoss(nn.Module):
    """Module form of :func:`patch_distillation_loss`."""

    def __init__(self, temperature: float = 0.07, teacher_temperature: float | None = None):
        super().__init__()
        self.temperature = temperature
        self.teacher_temperature = teacher_temperature

    def forward(self, teacher: Tensor, student: Tensor, key: Tensor, queue: Tensor, queue_labels: Tensor) -> Tensor:
        return patch_distillation_loss(teacher, student, key, queue, queue_labels, self.temperature,
                                       self.teacher_temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, teacher_temperature={self.teacher_temperature}"
