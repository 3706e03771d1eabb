"""Training-health signals of stage 1 and the guards around them."""

import math

import pytest
import torch
import torch.nn.functional as F

from dscl.cli import main
from dscl.config import load_config
from dscl.engine.evaluate import knn_predict
from dscl.engine.pretrain import build_stage1_model
from dscl.losses import key_probability


def test_knn_predict_matches_a_per_row_reference():
    # Bug caught: votes by count instead of summed similarity, or Euclidean instead of cosine.
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(50, 8, generator=g) * torch.rand(50, 1, generator=g) * 5  # unnormalised rows
    bank_labels = torch.randint(0, 4, (50,), generator=g)
    queries = torch.randn(30, 8, generator=g)
    expected = []
    for q in queries:
        sims = [float(torch.dot(q, b) / (q.norm() * b.norm())) for b in bank]
        top = sorted(range(50), key=lambda j: -sims[j])[:7]
        votes = [0.0] * 4
        for j in top:
            votes[int(bank_labels[j])] += sims[j]
        expected.append(max(range(4), key=lambda c: votes[c]))
    assert knn_predict(bank, bank_labels, queries, k=7, chunk=8).tolist() == expected


def test_key_probability_matches_the_definition():
    # Bug caught: the own query z_i left among its candidates, or empty queue slots counted.
    g = torch.Generator().manual_seed(1)
    q, k = (F.normalize(torch.randn(6, 5, generator=g), dim=1) for _ in range(2))
    queue = F.normalize(torch.randn(9, 5, generator=g), dim=1)
    queue_labels = torch.tensor([0, 1, -1, 2, -1, 0, 1, 1, 2])
    tau = 0.2
    probs = []
    for i in range(6):
        cands = [q[b] for b in range(6) if b != i] + list(k) + [queue[j] for j in range(9) if queue_labels[j] >= 0]
        z = sum(math.exp(float(q[i] @ a) / tau) for a in cands)
        probs.append(math.exp(float(q[i] @ k[i]) / tau) / z)
    assert float(key_probability(q, k, queue, queue_labels, tau)) == pytest.approx(sum(probs) / 6, rel=1e-5)


def test_patch_crops_stay_out_of_the_running_statistics():
    # Bug caught: 16-px crops updating the BN running statistics used later on 32-px images.
    cfg = load_config(None, ["method=dscl+pbsd", "pretrain.queue_size=64", "pretrain.batch_size=4",
                             "pretrain.num_patches=2", "pretrain.key_bn_groups=2"])
    boxes = torch.tensor([0.0, 0.0, 16.0, 16.0]).repeat(4, 2, 1)
    views = (torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), torch.randn(4, 2, 3, 16, 16) * 5 + 3)

    def running_mean_after(patch_bn_stats: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = build_stage1_model(cfg, 4)
        model.patch_bn_stats = patch_bn_stats
        model.train()
        model(*views, boxes)
        return model.encoder.bn1.running_mean.clone()

    torch.manual_seed(0)
    model = build_stage1_model(cfg, 4).train()
    model(views[0], views[1])  # the global views alone
    assert torch.equal(running_mean_after(False), model.encoder.bn1.running_mean)
    assert not torch.allclose(running_mean_after(True), model.encoder.bn1.running_mean)


def test_every_epoch_logs_the_health_signals_and_a_long_queue_warns(tmp_path, tiny_overrides):
    out = tmp_path / "run"
    overrides = tiny_overrides + ["method=dscl", "pretrain.queue_size=500", "pretrain.knn_every=1"]
    assert main(["pretrain", "--out", str(out), *[x for o in overrides for x in ("--set", o)]]) == 0
    header, *rows = (out / "metrics.csv").read_text().splitlines()
    columns = header.split(",")
    assert "knn_top1" in columns and "p_key" in columns
    for row in rows:
        values = dict(zip(columns, row.split(",")))
        assert 0.0 <= float(values["knn_top1"]) <= 100.0
        assert 0.0 < float(values["p_key"]) < 1.0
    log = (out / "log.txt").read_text()
    assert "pretrain.queue_size 500 exceeds the 127 training images" in log
