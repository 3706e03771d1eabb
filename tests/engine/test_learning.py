"""Something learns: short training on a small synthetic set moves the model the right way."""

import copy
import json

import numpy as np
import torch
import torch.nn.functional as F

from dscl.cli import main
from dscl.config import load_config
from dscl.engine.pretrain import build_stage1_model, stage1_losses
from dscl.engine.runner import load_data
from dscl.engine.views import stage1_transform

SMALL = ["data.synthetic_classes=4", "data.synthetic_n_max=40", "data.imbalance_ratio=1",
         "data.synthetic_eval_per_class=25", "pretrain.batch_size=32", "pretrain.queue_size=64",
         "pretrain.key_bn_groups=4", "pretrain.ema_momentum=0.9", "pretrain.lr=0.1"]


def class_gap(model, images, labels) -> float:
    """Mean cosine of same-class pairs minus that of different-class pairs. BatchNorm uses the
    batch's statistics (on a copy, so the running ones stay as they were): after a few dozen
    steps the running statistics still lag, and eval mode squeezes every embedding together
    (cosines near 0.99), which left the measured gap to the thread count's rounding."""
    with torch.no_grad():
        model = copy.deepcopy(model).train()
        z = F.normalize(model.head(model.encoder(images)), dim=1)
    sims, same = z @ z.T, labels[:, None] == labels[None]
    off_diagonal = ~torch.eye(len(labels), dtype=torch.bool)
    return float(sims[same & off_diagonal].mean() - sims[~same].mean())


def test_dscl_stage1_separates_classes_on_held_out_images():
    """Stage 1 trained on a fixed batch of 32 training images separates the classes of the 128
    other training images, which it never sees (same-class cosines rise above different-class ones).

    Guards against:
    - any break of the stage-1 step that stops the representation from learning (a gradient
      that does not reach the encoder, keys or labels misaligned with the queries, collapse
      through the momentum encoder); the loss value alone is too noisy to show it;
    - a "gain" that is memorisation of the 32 trained images only (measured on others here).
    """
    cfg = load_config(None, ["method=dscl", *SMALL])
    splits = load_data(cfg)
    targets = np.asarray(splits.train.targets)
    index = np.concatenate([np.where(targets == c)[0][:8] for c in range(4)])
    images, labels = torch.from_numpy(splits.train.data[index]), torch.as_tensor(targets[index])
    torch.manual_seed(0)
    model = build_stage1_model(cfg, 4).train()
    transform = stage1_transform(cfg, 32, on_device=True)
    rest = np.setdiff1d(np.arange(len(targets)), index)  # the 4 x 32 training images it never sees
    held_out = transform.normalise(torch.from_numpy(splits.train.data[rest]).permute(0, 3, 1, 2).float() / 255)
    held_out_labels = torch.as_tensor(targets[rest])
    assert np.bincount(targets[rest]).tolist() == [32] * 4
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.pretrain.lr, momentum=0.9)
    before = class_gap(model, held_out, held_out_labels)
    for step in range(40):
        views = transform(images, generator=torch.Generator().manual_seed(step))
        loss, parts, keys = stage1_losses(model, (views, labels), cfg, torch.device("cpu"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.queue.enqueue(keys, labels)
    after = class_gap(model, held_out, held_out_labels)
    # measured: 0.002 -> 0.104 (CPU, torch 2.x); half of that rise is asked
    assert after > before + 0.05, f"same- minus different-class cosine {before:.4f} -> {after:.4f}"


def test_ce_run_lowers_its_loss_and_beats_chance_on_validation(tmp_path):
    # Bug caught: a training loop that does not step the optimiser, a wrong label pipeline,
    # or evaluation on mismatched labels (validation accuracy would stay near chance, 25 %).
    out = tmp_path / "ce"
    overrides = ["method=ce", *SMALL, "pretrain.lr=0.8", "pretrain.epochs=5", "pretrain.warmup_epochs=1",
                 "pretrain.knn_every=0"]
    assert main(["run", "--out", str(out), *[x for o in overrides for x in ("--set", o)]]) == 0
    rows = [line.split(",") for line in (out / "metrics.csv").read_text().splitlines()]
    losses = [float(r[rows[0].index("loss")]) for r in rows[1:]]
    assert losses[-1] < 0.7 * losses[0], losses
    results = json.loads((out / "results.json").read_text())
    assert results["val_top1"] >= 50.0, results["val_top1"]


def test_dscl_pipeline_beats_chance_on_the_held_out_test_split(tmp_path):
    """A whole DSCL run (stage 1, stage 2 on the frozen backbone, evaluation) classifies the 100
    test images it never trained on far above chance (25 %, four balanced classes).

    Measured on this budget: 74 % test, 79 % validation (CPU, torch 2.x); 50 % is asked.
    Stage 2 on a random backbone also scores high on this easy data (84 % measured), so this
    guards the pipeline's wiring; that stage 1 learns is shown by the held-out cosine test above.

    Guards against:
    - stage 2 training a classifier that is never kept or loaded (a fresh layer evaluated);
    - the test (or validation) predictions compared with misaligned or other labels;
    - a stage 2 that does not train (no optimiser step, or a zero learning rate reaching it).
    """
    out = tmp_path / "dscl"
    overrides = ["method=dscl", *SMALL, "pretrain.lr=0.4", "pretrain.epochs=5", "pretrain.warmup_epochs=1",
                 "pretrain.knn_every=0", "linear.epochs=10", "linear.milestones=[]", "linear.augment=false"]
    assert main(["run", "--out", str(out), *[x for o in overrides for x in ("--set", o)]]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["test_images"] == 100 and results["stage2"]["selected_on"] == "val"
    assert results["overall"] >= 50.0 and results["val_top1"] >= 50.0, results
