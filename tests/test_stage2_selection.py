"""``benchmarks/stage2_selection.py``: stage 2 of a finished run trained again, epoch by epoch, and
the kept epoch chosen again on subsets of the validation split.

Guards against: the script training another stage 2 than the run's (its per-epoch validation
accuracies would differ from the run's metrics.csv, and its choice on the whole split from the
run's kept epoch); a moving average that looks ahead or divides by the wrong count; a subset draw
that ignores k; the reference row (best on test) offered as a choice."""

import json
import sys
from pathlib import Path

import pytest
import torch

from dscl.cli import main as dscl_main

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import stage2_selection  # noqa: E402

sys.path.remove(str(ROOT / "benchmarks"))


def test_trailing_mean_against_a_loop():
    values = torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0])
    expected = [sum(values[max(0, e - 2) : e + 1].tolist()) / min(e + 1, 3) for e in range(len(values))]
    assert torch.allclose(stage2_selection.trailing_mean(values, 3).float(), torch.tensor(expected))


def test_choices_on_a_constructed_table():
    # 5 epochs x 4 images: accuracies 0.25, 1, 0.25, 0.75, 0.75; their 2-epoch means 0.25, 0.625,
    # 0.625, 0.5, 0.75: one lucky epoch wins "best", the steady end wins the mean
    correct = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)
    labels = torch.tensor([0, 0, 1, 1])
    assert stage2_selection.choices(correct, labels, smooth=2) == {"best": 1, "best of 2-epoch mean": 4, "last": 4}
    assert stage2_selection.choices(correct[:3], labels, smooth=2)["best of 2-epoch mean"] == 1  # first of equal means


def test_uneven_classes_choose_on_the_mean_per_class_accuracy():
    # class 0: 1 image, class 1: 3 images. Epoch 0 gets class 0 only (plain 0.25, per class 0.5);
    # epoch 1 gets 2 of class 1 only (plain 0.5, per class 0.33): the per-class mean picks epoch 0
    correct = torch.tensor([[1, 0, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    labels = torch.tensor([0, 1, 1, 1])
    expected = torch.tensor([0.5, 1 / 3], dtype=torch.double)
    assert torch.allclose(stage2_selection.val_accuracy(correct, labels), expected)
    assert stage2_selection.choices(correct, labels, smooth=1)["best"] == 0
    assert stage2_selection.choices(correct, torch.tensor([0, 0, 1, 1]), smooth=1)["best"] == 1  # even: plain


def test_extra_validation_images_are_unseen_and_widen_the_runs_split(tmp_path):
    from PIL import Image

    from dscl.config import load_config
    from dscl.engine.runner import load_data

    for split, sizes in (("train", (12, 12)), ("test", (2, 2))):
        for c, n in enumerate(sizes):
            (tmp_path / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (20 * c, 10 * i, 0)).save(tmp_path / split / f"c{c}" / f"{i}.png")
    # ratio 12 keeps 12 of class 0 (none left over) and 1 of class 1 (11 left over)
    cfg = load_config(overrides=["data.name=imagefolder", f"data.root={tmp_path}", "data.imbalance_ratio=12",
                                 "data.val_per_class=2"])
    splits = load_data(cfg)
    extra = stage2_selection.unseen_validation(cfg, splits, 3)
    seen = set(splits.train.paths) | set(splits.val.paths)
    assert not seen & set(extra.paths)
    assert sorted(extra.targets) == [1, 1, 1]  # the head class has no unseen image left
    wider = load_data(load_config(base=cfg.to_dict(), overrides=["data.val_per_class=5"]))
    assert set(splits.val.paths) <= set(wider.val.paths)  # the run's own split is part of the wider one


def test_selection_reproduces_the_runs_stage2_and_its_kept_epoch(tmp_path, tiny_overrides):
    out = tmp_path / "run"
    sets = [x for o in tiny_overrides + ["method=dscl", "linear.epochs=4", "linear.milestones=[3]"]
            for x in ("--set", o)]
    assert dscl_main(["run", "--out", str(out), *sets]) == 0
    report = tmp_path / "selection.json"
    assert stage2_selection.main([str(out), "--per-class", "1", "--draws", "7", "--json", str(report)]) == 0
    figures = json.loads(report.read_text())
    results = json.loads((out / "results.json").read_text())
    assert figures["matches_run"] and len(figures["val_top1"]) == 4
    rows = {(r["per_class"], r["rule"]): r for r in figures["rows"]}
    full = max(k for k, _ in rows if k is not None)
    assert rows[full, "best"]["epoch"] == results["stage2"]["best_epoch"] and rows[full, "best"]["draws"] == 1
    assert rows[1, "best"]["draws"] == 7 and rows[1, "best"]["images"] == 5  # 1 per class, 5 classes
    assert rows[full, "last"]["overall_mean"] == pytest.approx(figures["test"][-1]["overall"])
    best_test = max(t["overall"] for t in figures["test"])
    assert rows[None, "best on test (reference only)"]["overall_mean"] == best_test
    assert all(r["overall_mean"] <= best_test + 1e-9 for r in figures["rows"])
