"""Logit adjustment against hand computations and a slow reference written from the formula
(Menon et al. 2021): loss = -log softmax(f(x) + tau * log pi)_y; post-hoc: argmax f(x) - tau * log pi."""

import math

import pytest
import torch

from dscl.engine.evaluate import posthoc_logit_adjustment
from dscl.losses import LogitAdjustedLoss, log_prior, logit_adjusted_loss, posthoc_adjust


def reference_loss(logits, labels, counts, tau):
    total = sum(counts)
    losses = []
    for row, y in zip(logits.tolist(), labels.tolist()):
        adjusted = [f + tau * math.log(n / total) for f, n in zip(row, counts)]
        log_z = math.log(sum(math.exp(a) for a in adjusted))
        losses.append(log_z - adjusted[y])
    return sum(losses) / len(losses)


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("classes", [2, 7])
def test_the_loss_is_its_formula(tau, classes):
    torch.manual_seed(classes)
    counts = [int(500 * 0.05 ** (c / max(1, classes - 1))) + 1 for c in range(classes)]
    logits, labels = torch.randn(9, classes) * 3, torch.randint(0, classes, (9,))
    got = logit_adjusted_loss(logits, labels, log_prior(counts), tau)
    assert got.item() == pytest.approx(reference_loss(logits, labels, counts, tau), rel=1e-5)
    assert LogitAdjustedLoss(counts, tau)(logits, labels).item() == pytest.approx(got.item(), rel=1e-6)


def test_tau_zero_is_plain_cross_entropy_and_the_adjustment_favours_the_tail():
    logits, labels = torch.zeros(1, 2), torch.tensor([1])
    log_pi = log_prior([90, 10])
    assert logit_adjusted_loss(logits, labels, log_pi, 0.0).item() == pytest.approx(math.log(2))
    # equal logits: the adjusted loss is -log(pi_tail) for a tail label, i.e. it asks the tail logit
    # to exceed the head's by log(pi_head / pi_tail) before the loss is as small as plain CE's
    assert logit_adjusted_loss(logits, labels, log_pi, 1.0).item() == pytest.approx(-math.log(0.1), rel=1e-6)


def test_posthoc_adjustment_by_hand_a_tau_that_flips_a_prediction():
    """Counts 900 / 100: log pi = log 0.9, log 0.1. Logits (2.0, 0.5) favour the head by 1.5;
    subtracting tau * log pi adds tau * (log 0.9 - log 0.1) = tau * 2.197 to the tail's margin,
    so the prediction flips to the tail for tau > 1.5 / 2.197 = 0.683."""
    log_pi = log_prior([900, 100])
    logits = torch.tensor([[2.0, 0.5]])
    assert posthoc_adjust(logits, log_pi, 0.5).argmax(1).item() == 0
    assert posthoc_adjust(logits, log_pi, 0.75).argmax(1).item() == 1
    expected = torch.tensor([[2.0 - 0.75 * math.log(0.9), 0.5 - 0.75 * math.log(0.1)]])
    assert torch.allclose(posthoc_adjust(logits, log_pi, 0.75), expected)


def test_tau_is_chosen_on_validation_never_on_test():
    """Validation is solved by tau >= 0.75 (its tail image needs the flip); the test split would
    be best at tau 0 (its only image is a head image close to the boundary). The choice follows
    validation: the smallest of its best taus, 0.75."""
    counts = [900, 100]
    val = (torch.tensor([[2.0, 0.5], [3.0, 0.0]]), torch.tensor([1, 0]))
    test = (torch.tensor([[1.0, 0.5]]), torch.tensor([0]))
    result = posthoc_logit_adjustment(val, test, counts)
    assert result["tau"] == 0.75 and result["val_top1"] == 100.0
    assert result["overall"] == 0.0  # at 0.75 the test image flips to the tail: reported as it is
    assert result["val_top1_by_tau"]["0"] == 50.0
