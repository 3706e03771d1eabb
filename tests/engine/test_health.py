"""Training-health signals of stage 1 and the guards around them."""

import math

import pytest
import torch
import torch.nn.functional as F

from dscl.cli import main
from dscl.config import load_config
from dscl.data import CIFAR_MEAN, CIFAR_STD, SyntheticLongTailed
from dscl.engine.checkpoint import load_checkpoint
from dscl.engine.evaluate import knn_predict
from dscl.engine.pretrain import build_stage1_model
from dscl.losses import decoupled_supcon_loss, key_probability
from dscl.losses.dense import dense_decoupled_supcon_loss


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
    for loss in (decoupled_supcon_loss, dense_decoupled_supcon_loss):  # what training logs, from the loss's logits
        signals = {}
        loss(q, k, torch.tensor([0, 1, 2, 0, 1, 2]), queue, queue_labels, temperature=tau, signals=signals)
        assert float(signals["p_key"]) == pytest.approx(sum(probs) / 6, rel=1e-5)


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


def reference_knn_top1(encoder, train, val, k) -> float:
    """Cosine k-NN top-1 (%) of the validation images against the training images, written
    out here: features of the un-augmented images (CIFAR normalisation) in eval mode, each
    validation image voting with the summed similarity of its k most similar training images."""

    def features(split):
        x = torch.from_numpy(split.data).permute(0, 3, 1, 2).float() / 255
        x = (x - torch.tensor(CIFAR_MEAN)[:, None, None]) / torch.tensor(CIFAR_STD)[:, None, None]
        with torch.no_grad():
            return F.normalize(encoder.eval()(x).double(), dim=1)

    bank, queries = features(train), features(val)
    correct = 0
    for query, label in zip(queries, val.targets):
        sims = (bank @ query).tolist()
        votes = {}
        for j in sorted(range(len(sims)), key=lambda j: -sims[j])[:k]:
            votes[train.targets[j]] = votes.get(train.targets[j], 0.0) + sims[j]
        correct += max(votes, key=votes.get) == label
    return 100.0 * correct / len(val.targets)


def test_every_epoch_logs_the_health_signals_and_a_long_queue_warns(tmp_path, tiny_overrides):
    """The logged k-NN top-1 of the last epoch is the one the saved stage-1 encoder gives.

    Guards against:
    - the k-NN signal measured on the test split (or the training split) instead of validation;
    - labels misaligned with the features, a fraction logged instead of a percentage, another
      k than pretrain.knn_k, or the accuracy of an encoder other than the one saved.
    """
    out = tmp_path / "run"
    overrides = tiny_overrides + ["method=dscl", "pretrain.queue_size=500", "pretrain.knn_every=1",
                                  "pretrain.knn_k=5"]
    assert main(["pretrain", "--out", str(out), *[x for o in overrides for x in ("--set", o)]]) == 0
    header, *rows = (out / "metrics.csv").read_text().splitlines()
    columns = header.split(",")
    assert "knn_top1" in columns and "p_key" in columns
    values = [dict(zip(columns, row.split(","))) for row in rows]
    assert len(values) == 2 and all(0.0 < float(v["p_key"]) < 1.0 for v in values)
    cfg = load_config(out / "config.yaml")
    model = build_stage1_model(cfg, 5)
    model.load_state_dict(load_checkpoint(out / "checkpoints" / "pretrain.pt")["model"])
    options = dict(num_classes=5, n_max=60, imbalance_ratio=10, n_per_class_eval=10, seed=0)
    train, val = (SyntheticLongTailed(split, **options) for split in ("train", "val"))
    expected = reference_knn_top1(model.encoder, train, val, k=5)
    assert float(values[-1]["knn_top1"]) == pytest.approx(expected, abs=1e-3)
    log = (out / "log.txt").read_text()
    assert "pretrain.queue_size 500 exceeds the 127 training images" in log
