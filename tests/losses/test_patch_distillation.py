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
