"""Gradient-norm ratio of the two kinds of positives (paper Eq. 6, 10, Fig. 2)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from dscl.analysis import anchor_gradient_ratios
from dscl.cli import main


def _orthogonal_case(labels, queue_labels):
    """Anchors, keys and queue entries all on distinct basis vectors: every logit z_i . a is 0,
    so p(a | z_i) = 1 / |A_i| for every candidate."""
    b, k = len(labels), len(queue_labels)
    eye = torch.eye(2 * b + k)
    return eye[:b], eye[b : 2 * b], torch.tensor(labels), eye[2 * b :], torch.tensor(queue_labels)


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_ratios_match_the_closed_form_when_all_candidates_are_equally_likely(alpha, temperature):
    # Bug caught: parts of k_i and P_i swapped, |P_i| counting k_i or the anchor itself, empty
    # queue slots taken as candidates, or the SCL weights given to DSCL.
    labels, queue_labels = [0, 0, 1, 2, 0, 1], [0, 1, -1, 0, 2, -1, 0, 1, 1]
    query, key, y, queue, queue_y = _orthogonal_case(labels, queue_labels)
    scl, sizes = anchor_gradient_ratios(query, key, y, queue, queue_y, None, temperature)
    dscl, sizes_d = anchor_gradient_ratios(query, key, y, queue, queue_y, alpha, temperature)
    b, valid = len(labels), sum(q >= 0 for q in queue_labels)
    num_candidates = (b - 1) + b + valid
    p = 1.0 / num_candidates
    for i, label in enumerate(labels):
        positives = 2 * (labels.count(label) - 1) + queue_labels.count(label)  # other queries + keys, queue
        assert int(sizes[i]) == int(sizes_d[i]) == positives
        assert float(scl[i]) == pytest.approx(1.0 / positives, rel=1e-5)  # Eq. 6, exact here
        expected = abs(p - alpha) / abs(positives * p - (1.0 - alpha))
        assert float(dscl[i]) == pytest.approx(expected, rel=1e-5)


def test_an_anchor_without_positives_has_no_ratio():
    query, key, y, queue, queue_y = _orthogonal_case([0, 1], [0, -1])
    ratios, sizes = anchor_gradient_ratios(query, key, y, queue, queue_y, 0.1)
    assert sizes.tolist() == [1, 0]
    assert not math.isnan(float(ratios[0])) and math.isnan(float(ratios[1]))


def _reference_ratio(z, key, labels, queue, queue_labels, i, alpha, tau):
    """From the definition: the part of candidate a in d loss_i / d z_i is (p(a|z_i) - w_a) a / tau."""
    b = len(labels)
    keep = queue_labels >= 0
    candidates = [z[j] for j in range(b) if j != i] + [key[j] for j in range(b)] + list(queue[keep])
    cand_labels = [int(labels[j]) for j in range(b) if j != i] + [int(v) for v in labels] + queue_labels[keep].tolist()
    own = b - 1 + i  # index of k_i among the candidates
    logits = torch.stack([z[i] @ a / tau for a in candidates])
    p = torch.softmax(logits.double(), 0)
    positives = [n for n, c in enumerate(cand_labels) if c == int(labels[i]) and n != own]
    w_key = 1.0 / (len(positives) + 1) if alpha is None else alpha
    w_pos = 1.0 / (len(positives) + 1) if alpha is None else (1.0 - alpha) / len(positives)
    key_part = (p[own] - w_key).abs() * candidates[own].norm() / tau
    pos_parts = sum((p[n] - w_pos).abs() * candidates[n].norm() / tau for n in positives)
    return float(key_part / pos_parts)


@pytest.mark.parametrize("alpha", [None, 0.1, 0.3])
def test_ratios_match_a_per_candidate_reference_on_random_features(alpha):
    # Bug caught: a ratio taken from the mean batch loss (mixing anchors), or gradients of the
    # other queries' own anchor terms leaking into anchor i's parts.
    g = torch.Generator().manual_seed(3)
    z, key = (F.normalize(torch.randn(7, 6, generator=g), dim=1) for _ in range(2))
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 1])
    queue = F.normalize(torch.randn(10, 6, generator=g), dim=1)
    queue_labels = torch.tensor([1, 0, -1, 2, 0, 1, -1, 0, 2, 1])
    ratios, _ = anchor_gradient_ratios(z, key, labels, queue, queue_labels, alpha, 0.2)
    for i in range(7):
        assert float(ratios[i]) == pytest.approx(_reference_ratio(z, key, labels, queue, queue_labels, i, alpha, 0.2),
                                                 rel=1e-4)


def test_cli_plots_the_ratios_at_initialisation(scl_run, tmp_path, capsys):
    out = tmp_path / "gradients.png"
    assert main(["analyze", "gradients", str(scl_run), "--init", "--batches", "3", "--device", "cpu",
                 "--out", str(out)]) == 0
    assert Image.open(out).format == "PNG"
    numbers = json.loads(out.with_suffix(".json").read_text())
    assert numbers["source"] == "initial weights" and numbers["batches"] == 3
    assert numbers["dscl_theory"] == pytest.approx(0.1 / 0.9)
    scl = [v for v in numbers["scl"] if v is not None]
    dscl = [v for v in numbers["dscl"] if v is not None]
    assert len(scl) >= 3 and all(v > 0 for v in scl + dscl)
    # Fig. 2: SCL's ratio spreads with class size, DSCL's stays near alpha / (1 - alpha)
    assert max(dscl) / min(dscl) < max(scl) / min(scl)
    for measured, theory in zip(numbers["scl"], numbers["scl_theory"]):
        if measured is not None:
            assert measured == pytest.approx(theory, rel=0.5)


def test_cli_measures_a_checkpoint(scl_run, tmp_path):
    assert main(["analyze", "gradients", str(scl_run), "--batches", "1", "--device", "cpu"]) == 0
    numbers = json.loads((scl_run / "analyses" / "gradients.json").read_text())
    assert numbers["source"] == "scl run, pretrain.pt" and numbers["alpha"] == 0.1


@pytest.mark.parametrize("case, words", [
    ("ce", "ce run"),
    ("missing", "no such checkpoint"),
    ("foreign", "not a dscl checkpoint"),
    ("other run", "belongs to a different run"),
    ("both", "not both"),
])
def test_cli_errors_are_one_clear_line(scl_run, ce_run, tmp_path, capsys, case, words):
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    args = {"ce": [str(ce_run)], "missing": [str(scl_run), "--checkpoint", str(tmp_path / "nope.pt")],
            "foreign": [str(scl_run), "--checkpoint", str(foreign)],
            "other run": [str(scl_run), "--checkpoint", str(ce_run / "checkpoints" / "pretrain.pt")],
            "both": [str(scl_run), "--init", "--checkpoint", str(foreign)]}[case]
    assert main(["analyze", "gradients", *args, "--device", "cpu", "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_cli_refuses_an_expert_run_naming_the_key(scl_run, tmp_path, capsys):
    experts = tmp_path / "experts"
    experts.mkdir()
    config = yaml.safe_load((scl_run / "config.yaml").read_text())
    config["model"]["experts"] = 3
    (experts / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["analyze", "gradients", str(experts), "--init", "--device", "cpu",
                 "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert "model.experts 3" in err and "model.experts 1 only" in err and "Traceback" not in err
