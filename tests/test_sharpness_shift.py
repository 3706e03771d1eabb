"""``benchmarks/sharpness_shift.py``: the sharpness statistic, the blurred split, and the blur
curve of a finished run.

Guards against: a statistic that is not the mean neighbour difference of the grey image; a
"blurred" split that changes the labels, does not blur, or is evaluated along another data path
than the split itself (its sigma-0 row would then differ from the run's own test top-1)."""

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from dscl.cli import main as dscl_main

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import sharpness_shift  # noqa: E402

sys.path.remove(str(ROOT / "benchmarks"))


def test_sharpness_of_stripes_against_the_formula():
    # columns alternate black and white: every horizontal neighbour differs by 255, no vertical one
    stripes = np.zeros((8, 8, 3), dtype=np.uint8)
    stripes[:, ::2] = 255
    assert sharpness_shift.sharpness(Image.fromarray(stripes)) == (0 + 255) / 2
    assert sharpness_shift.sharpness(Image.fromarray(stripes.transpose(1, 0, 2).copy())) == 127.5
    assert sharpness_shift.sharpness(Image.new("RGB", (8, 8), (10, 200, 30))) == 0.0


class _Split:
    def __init__(self, images, targets):
        self.images, self.targets = images, targets

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


def test_blurred_split_keeps_labels_and_blurs_only_with_a_sigma():
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(3)]
    split = _Split(images, [2, 0, 1])
    same, blurred = sharpness_shift.Blurred(split, 0.0), sharpness_shift.Blurred(split, 1.0)
    assert same.targets == blurred.targets == [2, 0, 1] and len(blurred) == 3
    assert all(np.array_equal(np.asarray(same[i][0]), np.asarray(images[i])) for i in range(3))
    assert all(sharpness_shift.sharpness(blurred[i][0]) < 0.6 * sharpness_shift.sharpness(images[i])
               for i in range(3))
    assert not hasattr(blurred, "data") and not hasattr(blurred, "paths")  # a plain list stays one


def test_split_sharpness_per_split_and_per_class():
    from types import SimpleNamespace

    flat, stripes = np.zeros((4, 4, 3), dtype=np.uint8), np.zeros((4, 4, 3), dtype=np.uint8)
    stripes[:, ::2] = 200  # sharpness (0 + 200) / 2 = 100
    flat, stripes = Image.fromarray(flat), Image.fromarray(stripes)
    splits = SimpleNamespace(classes=["a", "b"], val=None,
                             train=_Split([flat, stripes, flat], [0, 0, 1]),
                             test=_Split([stripes, flat, stripes], [0, 1, 1]))
    out = sharpness_shift.split_sharpness(splits, [0.0, 1.0])
    assert out["sharpness"] == {"train": round(100 / 3, 2), "test": round(200 / 3, 2)}
    # class a: 50 -> 100 (sharper), class b: 0 -> 50 (no ratio to a flat training class)
    assert out["classes_with_sharper_test"] == "1 of 1"
    assert out["test_over_train_median"] == 2.0
    assert list(out["test_blurred"]) == ["1"] and out["test_blurred"]["1"] < out["sharpness"]["test"]


def test_blur_curve_at_sigma_zero_is_the_runs_own_test_result(tmp_path, tiny_overrides):
    out = tmp_path / "run"
    sets = [x for o in tiny_overrides + ["method=ce", "data.val_per_class=4"] for x in ("--set", o)]
    assert dscl_main(["run", "--out", str(out), *sets]) == 0
    own = json.loads((out / "results.json").read_text())
    rows = list(sharpness_shift.blur_curve(str(out), None, [0.0, 0.8]))
    assert [row["sigma"] for row in rows] == [0.0, 0.8]
    assert rows[0]["overall"] == round(own["overall"], 2) and rows[0]["medium"] == round(own["medium"], 2)
    assert {"posthoc_la", "tau"} <= rows[0].keys()
