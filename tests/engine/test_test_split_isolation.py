"""The test split is read by the final evaluation only: poisoning its labels changes nothing before."""

import json
import random

import torch

import dscl.engine.runner
from dscl.cli import main
from dscl.engine.checkpoint import load_checkpoint

TIMINGS = {"seconds", "images_per_s"}  # differ from run to run whatever the data


def assert_same(a, b, where="checkpoint"):
    """Equal contents, tensors bit for bit, timing fields aside."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            if key not in TIMINGS:
                assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for n, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{n}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def metrics_without_timings(run_dir):
    header, *rows = (run_dir / "metrics.csv").read_text().splitlines()
    columns = header.split(",")
    return [{c: v for c, v in zip(columns, row.split(",")) if c not in TIMINGS} for row in rows]


def test_shuffled_test_labels_change_nothing_before_the_final_evaluation(tmp_path, tiny_overrides, monkeypatch):
    """Two runs of the same configuration, the second with its test labels shuffled before
    training starts: stage 1 and stage 2 must give identical checkpoints, logs and stage-2
    selection; only the final test accuracy may differ (and does, so the poison reached it).

    Guards against:
    - stage 2 choosing its epoch (or its checkpoint) on the test split instead of validation;
    - the stage-1 k-NN health signal, or any other per-epoch figure, computed on the test split;
    - test images or labels mixed into either training stage.
    """
    overrides = tiny_overrides + ["method=dscl", "pretrain.knn_every=1", "linear.epochs=4", "linear.milestones=[3]"]
    sets = [x for o in overrides for x in ("--set", o)]
    assert main(["run", "--out", str(tmp_path / "clean"), *sets]) == 0

    real_load_data = dscl.engine.runner.load_data

    def poisoned_load_data(cfg):
        splits = real_load_data(cfg)
        labels = list(splits.test.targets)
        random.Random(0).shuffle(labels)
        assert sum(a != b for a, b in zip(labels, splits.test.targets)) > len(labels) // 2
        splits.test.targets[:] = labels
        return splits

    monkeypatch.setattr(dscl.engine.runner, "load_data", poisoned_load_data)
    assert main(["run", "--out", str(tmp_path / "poisoned"), *sets]) == 0

    clean, poisoned = tmp_path / "clean", tmp_path / "poisoned"
    names = sorted(p.name for p in (clean / "checkpoints").iterdir())
    assert names == ["linear_best.pt", "linear_last.pt", "pretrain.pt", "pretrain_last.pt"]
    assert sorted(p.name for p in (poisoned / "checkpoints").iterdir()) == names
    for name in names:
        assert_same(load_checkpoint(clean / "checkpoints" / name), load_checkpoint(poisoned / "checkpoints" / name),
                    name)
    assert metrics_without_timings(clean) == metrics_without_timings(poisoned)
    before, after = (json.loads((run / "results.json").read_text()) for run in (clean, poisoned))
    assert before["stage2"] == after["stage2"] and before["stage2"]["selected_on"] == "val"
    assert before["val_top1"] == after["val_top1"]
    assert before["per_class"] != after["per_class"]  # the shuffled labels did reach the final evaluation
