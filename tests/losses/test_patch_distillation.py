"""PBSD loss against a per-patch reference written from SPEC section 3."""

import pytest
import torch
import torch.nn.functional as F

from dscl.losses import PatchDistillationLoss, patch_distillation_loss
from dscl.losses.dense import dense_patch_distillation_loss


def reference_loss(teacher, student, key, queue, queue_labels, tau):
    valid = [m for m in range(queue.shape[0]) if int(queue_labels[m]) >= 0]
    losses = []
    for i in range(teacher.shape[0]):
        candidates = torch.stack([key[i]] + [queue[m] for m in valid])  # k_i first, then valid queue
        for j in range(teacher.shape[1]):
            t = torch.softmax(candidates @ teacher[i, j].detach() / tau, 0)
            log_s = torch.log_softmax(candidates @ student[i, j] / tau, 0)
            losses.append(-(t * log_s).sum())
    return torch.stack(losses).mean()


def random_inputs(batch=4, patches=3, dim=16, queue_size=12, empty=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = F.normalize(torch.randn(batch, patches, dim, generator=g), dim=2)
    student = F.normalize(torch.randn(batch, patches, dim, generator=g), dim=2)
    key = F.normalize(torch.randn(batch, dim, generator=g), dim=1)
    queue = F.normalize(torch.randn(queue_size, dim, generator=g), dim=1)
    queue_labels = torch.randint(0, 5, (queue_size,), generator=g)
    queue_labels[:empty] = -1
    return teacher, student, key, queue, queue_labels


@pytest.mark.parametrize("loss", [patch_distillation_loss, dense_patch_distillation_loss], ids=["factorised", "dense"])
@pytest.mark.parametrize("tau", [0.07, 0.2, 1.0])
@pytest.mark.parametrize("shape", [(4, 3, 16, 12, 4), (2, 5, 8, 0, 0), (3, 1, 8, 30, 29), (1, 5, 32, 40, 0)])
def test_matches_reference(tau, shape, loss):
    """Both implementations (the one trained with, the dense one `dscl bench --reference` times)
    against the per-patch reference above, which shares no code with either.

    Guards against:
    - empty queue slots taking part (the dense form drops them through `valid_queue`);
    - the teacher and student swapped, the own key left out, or a wrong temperature.
    """
    batch, patches, dim, queue_size, empty = shape
    inputs = random_inputs(batch, patches, dim, queue_size, empty, seed=sum(shape))
    torch.testing.assert_close(loss(*inputs, temperature=tau), reference_loss(*inputs, tau), rtol=1e-5, atol=1e-5)


def test_gradient_reaches_student_only():
    teacher, student, key, queue, queue_labels = random_inputs()
    teacher.requires_grad_(True)
    student.requires_grad_(True)
    s_ref = student.detach().clone().requires_grad_(True)
    patch_distillation_loss(teacher, student, key, queue, queue_labels).backward()
    reference_loss(teacher.detach(), s_ref, key, queue, queue_labels, 0.07).backward()
    assert teacher.grad is None
    torch.testing.assert_close(student.grad, s_ref.grad, rtol=1e-4, atol=1e-6)


def test_minimised_when_student_equals_teacher():
    teacher, _, key, queue, queue_labels = random_inputs(seed=5)
    at_teacher = patch_distillation_loss(teacher, teacher.clone(), key, queue, queue_labels)
    for seed in range(3):
        other = random_inputs(seed=10 + seed)[1]
        assert patch_distillation_loss(teacher, other, key, queue, queue_labels) > at_teacher


def test_empty_slots_ignored_and_module_form():
    # Bugs caught: empty slots taking part, or the module form dropping its temperature.
    teacher, student, key, queue, queue_labels = random_inputs(empty=6)
    expected = reference_loss(teacher, student, key, queue, queue_labels, 0.2)
    torch.testing.assert_close(PatchDistillationLoss(temperature=0.2)(teacher, student, key, queue, queue_labels),
                               expected, rtol=1e-5, atol=1e-5)
    # whatever sits in an empty slot changes nothing
    queue2 = queue.clone()
    queue2[queue_labels < 0] = F.normalize(torch.randn(6, queue.shape[1]), dim=1)
    torch.testing.assert_close(patch_distillation_loss(teacher, student, key, queue2, queue_labels),
                               patch_distillation_loss(teacher, student, key, queue, queue_labels))


def test_rejects_bad_shapes():
    teacher, student, key, queue, queue_labels = random_inputs()
    with pytest.raises(ValueError):
        patch_distillation_loss(teacher, student[:, :2], key, queue, queue_labels)
    with pytest.raises(ValueError):
        patch_distillation_loss(teacher, student, key[:2], queue, queue_labels)


def reference_signals(teacher, student, key, queue, queue_labels, tau, tau_teacher):
    """The signals patch by patch, over the explicit candidate list [k_i; valid queue]."""
    valid = [m for m in range(queue.shape[0]) if int(queue_labels[m]) >= 0]
    rows = {"pbsd_teacher_entropy": [], "pbsd_student_entropy": [], "pbsd_teacher_own": [], "pbsd_agreement": []}
    for i in range(teacher.shape[0]):
        candidates = torch.stack([key[i]] + [queue[m] for m in valid])
        for j in range(teacher.shape[1]):
            t = torch.softmax(candidates @ teacher[i, j] / tau_teacher, 0).double()
            s = torch.softmax(candidates @ student[i, j] / tau, 0).double()
            rows["pbsd_teacher_entropy"].append(-sum(p * torch.log(p) for p in t if p > 0))
            rows["pbsd_student_entropy"].append(-sum(p * torch.log(p) for p in s if p > 0))
            rows["pbsd_teacher_own"].append(t[0])
            rows["pbsd_agreement"].append(float(int(t.argmax()) == int(s.argmax())))
    return {name: float(sum(values) / len(values)) for name, values in rows.items()}


@pytest.mark.parametrize("shape", [(4, 3, 16, 12, 4), (3, 1, 8, 30, 29), (2, 5, 8, 0, 0)])
@pytest.mark.parametrize("tau_teacher", [None, 0.04])
@pytest.mark.parametrize("loss_fn", [patch_distillation_loss, dense_patch_distillation_loss],
                         ids=["factorised", "dense"])
def test_signals_match_reference(shape, tau_teacher, loss_fn):
    """The training health signals the step logs, taken from the loss's own logits, against the
    per-patch reference; the dense form (what ``dscl bench --reference`` trains with) gives them
    too. Guards against: empty slots counted in an entropy (log(1 + K) wrong), the teacher's
    temperature not applied to it, student and teacher swapped, agreement measured on the queue
    alone (the own key, column 0, left out); a loss form the training step calls with signals=
    that does not take them."""
    inputs = random_inputs(*shape, seed=sum(shape))
    signals = {}
    loss = loss_fn(*inputs, temperature=0.2, teacher_temperature=tau_teacher, signals=signals)
    assert set(signals) == set(reference_signals(*inputs, 0.2, tau_teacher or 0.2))
    for name, expected in reference_signals(*inputs, 0.2, tau_teacher or 0.2).items():
        assert float(signals[name]) == pytest.approx(expected, abs=1e-5), name
    torch.testing.assert_close(loss, loss_fn(*inputs, temperature=0.2, teacher_temperature=tau_teacher))


def test_distillation_signals_are_the_losss_own():
    from dscl.losses import distillation_signals

    inputs = random_inputs(4, 3, 16, 12, 4, seed=7)
    signals = {}
    patch_distillation_loss(*inputs, 0.2, 0.04, signals)
    assert {k: float(v) for k, v in distillation_signals(*inputs, 0.2, 0.04).items()} == \
        {k: float(v) for k, v in signals.items()}


def test_agreement_counts_the_own_key():
    """Teacher and student both most sure of the own key: agreement 1, which a comparison over the
    queue slots alone (or with the own key last) would not give."""
    key = F.normalize(torch.tensor([[1.0, 0.0, 0.0]]), dim=1)
    queue = F.normalize(torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.6, 0.8, 0.0]]), dim=1)
    near_key = F.normalize(torch.tensor([[[1.0, 0.1, 0.0]]]), dim=2)
    signals = {}
    patch_distillation_loss(near_key, near_key.clone(), key, queue, torch.tensor([0, 1, 2]), signals=signals)
    assert float(signals["pbsd_agreement"]) == 1.0 and float(signals["pbsd_teacher_own"]) > 0.5
