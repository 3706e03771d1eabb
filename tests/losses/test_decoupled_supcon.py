"""DSCL / SCL loss against a slow per-anchor reference written from SPEC section 2."""

import pytest
import torch
import torch.nn.functional as F

from dscl.losses import DecoupledSupConLoss, alpha_from_beta, decoupled_supcon_loss, effective_number_weights
from dscl.losses.dense import dense_decoupled_supcon_loss


def reference_loss(query, key, labels, queue, queue_labels, alpha, tau, anchor_weight=None):
    """One anchor at a time, candidates listed explicitly, formula as written in the paper;
    ``anchor_weight`` (per anchor) scales each anchor's term before the mean."""
    batch = query.shape[0]
    losses = []
    for i in range(batch):
        candidates, cand_labels, is_own_key = [], [], []
        for b in range(batch):
            if b != i:
                candidates.append(query[b])
                cand_labels.append(int(labels[b]))
                is_own_key.append(False)
        for b in range(batch):
            candidates.append(key[b])
            cand_labels.append(int(labels[b]))
            is_own_key.append(b == i)
        for m in range(queue.shape[0]):
            if int(queue_labels[m]) >= 0:
                candidates.append(queue[m])
                cand_labels.append(int(queue_labels[m]))
                is_own_key.append(False)
        logits = torch.stack([query[i] @ a / tau for a in candidates])
        log_p = logits - torch.logsumexp(logits, 0)
        own = [n for n, own in enumerate(is_own_key) if own][0]
        positives = [n for n, lab in enumerate(cand_labels) if lab == int(labels[i]) and not is_own_key[n]]
        if not positives:
            losses.append(-log_p[own])
        elif alpha is None:
            weight = 1.0 / (len(positives) + 1)
            losses.append(-weight * (log_p[own] + sum(log_p[n] for n in positives)))
        else:
            losses.append(-(alpha * log_p[own] + (1 - alpha) / len(positives) * sum(log_p[n] for n in positives)))
        if anchor_weight is not None:
            losses[-1] = anchor_weight[i] * losses[-1]
    return torch.stack(losses).mean()


def beta_reference(query, key, labels, queue, queue_labels, beta, tau):
    """The authors' spelling: weight 1 on k_i, beta/|P_i| on each positive, normalised by the sum."""
    losses = []
    feats = torch.cat([query, key, queue])
    for i in range(query.shape[0]):
        total = 0.0
        lab = torch.cat([labels, labels, queue_labels])
        valid = lab >= 0
        valid[i] = False  # the anchor itself is not a candidate
        logits = (feats @ query[i]) / tau
        log_z = torch.logsumexp(logits[valid], 0)
        pos = valid & (lab == labels[i])
        pos[query.shape[0] + i] = False
        n = int(pos.sum())
        weights = torch.zeros_like(logits)
        weights[query.shape[0] + i] = 1.0
        if n:
            weights[pos] = beta / n
        weights = weights / weights.sum()
        total = -(weights * (logits - log_z)).sum()
        losses.append(total)
    return torch.stack(losses).mean()


def random_inputs(batch=8, dim=16, queue_size=20, classes=3, empty=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    query = F.normalize(torch.randn(batch, dim, generator=g), dim=1)
    key = F.normalize(torch.randn(batch, dim, generator=g), dim=1)
    labels = torch.randint(0, classes, (batch,), generator=g)
    queue = F.normalize(torch.randn(queue_size, dim, generator=g), dim=1)
    queue_labels = torch.randint(0, classes, (queue_size,), generator=g)
    queue_labels[torch.randperm(queue_size, generator=g)[:empty]] = -1
    return query, key, labels, queue, queue_labels


@pytest.mark.parametrize("loss", [decoupled_supcon_loss, dense_decoupled_supcon_loss], ids=["factorised", "dense"])
@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0, 0.0, None])
@pytest.mark.parametrize("tau", [0.07, 0.5])
@pytest.mark.parametrize("shape", [(8, 16, 20, 3, 5), (5, 8, 7, 10, 0), (4, 8, 0, 2, 0), (6, 8, 9, 50, 9)])
def test_matches_reference(alpha, tau, shape, loss):
    """Both implementations (the factorised one trained with, the dense one `dscl bench --reference`
    times) against the per-anchor reference above, which shares no code with either.

    Guards against:
    - a wrong weight, normaliser or positive set in either form;
    - empty queue slots (label -1) taking part (the dense form drops them through `valid_queue`).
    """
    batch, dim, queue_size, classes, empty = shape
    inputs = random_inputs(batch, dim, queue_size, classes, empty, seed=batch + queue_size)
    expected = reference_loss(*inputs, alpha=alpha, tau=tau)
    actual = loss(*inputs, alpha=alpha, temperature=tau)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.1, None])
def test_per_anchor_weights_match_reference(alpha):
    inputs = random_inputs(batch=8, classes=3, seed=11)
    counts = torch.tensor([500, 40, 5])
    weight = effective_number_weights(counts)[inputs[2]]
    expected = reference_loss(*inputs, alpha=alpha, tau=0.1, anchor_weight=weight)
    torch.testing.assert_close(decoupled_supcon_loss(*inputs, alpha=alpha, temperature=0.1, weight=weight), expected)
    torch.testing.assert_close(dense_decoupled_supcon_loss(*inputs, alpha=alpha, temperature=0.1, weight=weight),
                               expected)
    assert not torch.allclose(expected, reference_loss(*inputs, alpha=alpha, tau=0.1))  # the weights matter


def test_effective_number_weights_from_the_formula():
    # Cui et al. 2019: w_c proportional to (1 - beta) / (1 - beta^n_c), summing to C
    counts = [5000, 500, 50, 5]
    beta = 0.9999
    raw = [(1 - beta) / (1 - beta**n) for n in counts]
    expected = torch.tensor([w * len(counts) / sum(raw) for w in raw])
    actual = effective_number_weights(torch.tensor(counts), beta)
    torch.testing.assert_close(actual, expected.float())
    assert actual[3] > actual[2] > actual[1] > actual[0]
    torch.testing.assert_close(effective_number_weights(torch.tensor([7, 7, 7]), beta), torch.ones(3))
    with pytest.raises(ValueError, match="beta"):
        effective_number_weights(torch.tensor(counts), 1.0)


def test_gradients_match_reference():
    query, key, labels, queue, queue_labels = random_inputs(seed=3)
    q1 = query.clone().requires_grad_(True)
    q2 = query.clone().requires_grad_(True)
    reference_loss(q1, key, labels, queue, queue_labels, 0.1, 0.07).backward()
    decoupled_supcon_loss(q2, key, labels, queue, queue_labels, 0.1, 0.07).backward()
    torch.testing.assert_close(q2.grad, q1.grad, rtol=1e-4, atol=1e-5)


def test_anchor_without_positive_gets_plain_key_term():
    # every anchor its own class, queue empty: loss_i = -log p(k_i | z_i), for any alpha
    query, key, _, queue, _ = random_inputs(batch=4, queue_size=6)
    labels = torch.arange(4)
    empty_labels = torch.full((6,), -1)
    logits = torch.cat([query @ query.T / 0.07 - torch.eye(4) * 1e9, query @ key.T / 0.07], 1)
    expected = -(torch.diagonal(query @ key.T) / 0.07 - torch.logsumexp(logits, 1)).mean()
    for alpha in (0.0, 0.1, None):
        torch.testing.assert_close(decoupled_supcon_loss(query, key, labels, queue, empty_labels, alpha=alpha),
                                   expected)


def test_empty_slots_take_no_part():
    query, key, labels, queue, queue_labels = random_inputs(empty=7)
    keep = queue_labels >= 0
    full = decoupled_supcon_loss(query, key, labels, queue, queue_labels)
    dropped = decoupled_supcon_loss(query, key, labels, queue[keep], queue_labels[keep])
    torch.testing.assert_close(full, dropped)
    # changing what sits in an empty slot changes nothing
    queue2 = queue.clone()
    queue2[~keep] = F.normalize(torch.randn(int((~keep).sum()), queue.shape[1]), dim=1)
    torch.testing.assert_close(decoupled_supcon_loss(query, key, labels, queue2, queue_labels), full)


def test_alpha_one_over_p_plus_one_reproduces_scl():
    # balanced labels so every anchor has the same |P_i| = 2*2-1 + 1 + 3 = ... computed below
    g = torch.Generator().manual_seed(1)
    query = F.normalize(torch.randn(6, 8, generator=g), dim=1)
    key = F.normalize(torch.randn(6, 8, generator=g), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    queue = F.normalize(torch.randn(9, 8, generator=g), dim=1)
    queue_labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    num_positive = 1 + 1 + 3  # the other query, the other key, three queue entries
    scl = decoupled_supcon_loss(query, key, labels, queue, queue_labels, alpha=None)
    dscl = decoupled_supcon_loss(query, key, labels, queue, queue_labels, alpha=1 / (num_positive + 1))
    torch.testing.assert_close(dscl, scl)
    assert not torch.allclose(decoupled_supcon_loss(query, key, labels, queue, queue_labels, alpha=0.1), scl)


@pytest.mark.parametrize("beta", [0.0, 1.0, 8.0, 20.0])
def test_beta_spelling(beta):
    inputs = random_inputs(seed=int(beta) + 7)
    # a temperature other than the default: bug caught, the module form dropping it
    expected = beta_reference(*inputs, beta=beta, tau=0.2)
    torch.testing.assert_close(DecoupledSupConLoss(beta=beta, temperature=0.2)(*inputs), expected, rtol=1e-5, atol=1e-5)
    assert alpha_from_beta(8.0) == pytest.approx(1 / 9)


@pytest.mark.parametrize("num_positive", [1, 4, 16, 64])
def test_gradient_norm_ratio(num_positive):
    """Eq. 6 and Eq. 10, measured: one anchor, its key, |P| same-class queue entries, many negatives.

    The gradient of the loss w.r.t. a candidate a is (p(a|z) - w_a) z / tau, so its norm is the
    size of that candidate's pull on the anchor; keys and queue are given requires_grad to read it.
    """
    g = torch.Generator().manual_seed(num_positive)
    dim, negatives = 128, 4000
    query = F.normalize(torch.randn(1, dim, generator=g), dim=1)
    key = F.normalize(torch.randn(1, dim, generator=g), dim=1).requires_grad_(True)
    queue = F.normalize(torch.randn(num_positive + negatives, dim, generator=g), dim=1).requires_grad_(True)
    queue_labels = torch.cat([torch.zeros(num_positive), torch.arange(negatives) % 50 + 1]).long()
    labels = torch.zeros(1, dtype=torch.long)
    for alpha, expected in [(None, 1 / num_positive), (0.1, 0.1 / 0.9), (0.3, 0.3 / 0.7)]:
        key.grad = queue.grad = None
        decoupled_supcon_loss(query, key, labels, queue, queue_labels, alpha=alpha).backward()
        ratio = key.grad.norm() / queue.grad[:num_positive].norm(dim=1).sum()
        assert ratio.item() == pytest.approx(expected, rel=0.05)


def optimum_on_the_sphere(alpha, num_positive, num_negative=20, tau=0.05, seed=0):
    """Minimise the library's loss over a free unit query for one anchor: its key e_0, |P|
    same-class queue entries e_1..e_|P| and other-class entries pointing away from all of them.
    Returns p(k|z) and p(a|z) for each positive at the optimum, and the negatives' total mass."""
    g = torch.Generator().manual_seed(seed)
    dim = num_positive + 1 + 8
    eye = torch.eye(dim)
    key, positives = eye[:1], eye[1 : 1 + num_positive]
    away = -F.normalize(eye[: 1 + num_positive].sum(0), dim=0)
    negatives = F.normalize(away + 0.3 * torch.randn(num_negative, dim, generator=g), dim=1)
    queue = torch.cat([positives, negatives])
    queue_labels = torch.cat([torch.zeros(num_positive), torch.ones(num_negative)]).long()
    labels = torch.zeros(1, dtype=torch.long)
    v = torch.randn(dim, generator=g).requires_grad_(True)
    opt = torch.optim.LBFGS([v], max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = decoupled_supcon_loss(F.normalize(v, dim=0)[None], key, labels, queue, queue_labels,
                                     alpha=alpha, temperature=tau)
        loss.backward()
        return loss

    opt.step(closure)
    z = F.normalize(v.detach(), dim=0)
    p = torch.softmax(torch.cat([key, queue]) @ z / tau, 0)  # candidates of a lone anchor: k, queue
    return p[0].item(), p[1 : 1 + num_positive], p[1 + num_positive :].sum().item()


@pytest.mark.parametrize("alpha, num_positive, expected", [(0.1, 4, 0.1), (None, 4, 1 / 5), (0.3, 9, 0.3),
                                                           (0.0, 3, 0.0)])
def test_optimum_probability(alpha, num_positive, expected):
    """At the optimum p(k_i|z_i) = alpha (DSCL) and 1/(|P_i|+1) (SCL), the rest shared evenly by P_i.

    The anchor is a free unit vector and the candidates are placed so that those
    probabilities are reachable (negatives far away), so the library's loss itself must put
    its minimum there. Bug caught: the weights of k_i and P_i swapped or mis-normalised, or
    k_i counted in P_i (the optimum then moves off alpha)."""
    p_key, p_positive, p_negative = optimum_on_the_sphere(alpha, num_positive)
    assert p_negative < 1e-3
    assert p_key == pytest.approx(expected, abs=5e-3)
    torch.testing.assert_close(p_positive, torch.full((num_positive,), (1 - expected) / num_positive),
                               rtol=0, atol=5e-3)


def test_rejects_bad_arguments():
    inputs = random_inputs()
    with pytest.raises(ValueError, match="alpha"):
        decoupled_supcon_loss(*inputs, alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        decoupled_supcon_loss(*inputs, temperature=0)
    with pytest.raises(ValueError, match="beta"):
        DecoupledSupConLoss(beta=-1)
    with pytest.raises(ValueError):
        decoupled_supcon_loss(inputs[0], inputs[1][:3], *inputs[2:])


@pytest.mark.parametrize("alpha", [0.1, None])
def test_given_num_classes_changes_nothing_and_empty_queue_keeps_gradients_finite(alpha):
    # training passes num_classes so no step reads the labels back from the device; a bound
    # above the largest label gives the same loss, and a queue of empty slots only (the first
    # step) leaves the gradient finite, as dropping the slots would
    inputs = random_inputs(classes=3, seed=5)
    torch.testing.assert_close(decoupled_supcon_loss(*inputs, alpha=alpha, num_classes=7),
                               decoupled_supcon_loss(*inputs, alpha=alpha))
    query, key, labels, queue, queue_labels = inputs
    q1, q2 = query.clone().requires_grad_(True), query.clone().requires_grad_(True)
    empty = torch.full_like(queue_labels, -1)
    decoupled_supcon_loss(q1, key, labels, queue, empty, alpha=alpha, num_classes=3).backward()
    decoupled_supcon_loss(q2, key, labels, queue[:0], empty[:0], alpha=alpha).backward()
    assert torch.isfinite(q1.grad).all()
    torch.testing.assert_close(q1.grad, q2.grad)
