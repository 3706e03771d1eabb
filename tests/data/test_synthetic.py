"""The generated long-tailed data set: determinism, profile, balanced eval splits, shared parts."""

import numpy as np
import pytest
from PIL import Image

from dscl.data import SyntheticLongTailed, longtail_counts
from dscl.data.synthetic import _design
from dscl.errors import DataError

SMALL = dict(num_classes=5, n_max=40, n_per_class_eval=8)


@pytest.fixture(scope="module")
def default_splits():
    return {s: SyntheticLongTailed(s) for s in ("train", "val", "test")}


def test_default_train_profile_is_long_tailed(default_splits):
    train = default_splits["train"]
    counts = np.bincount(train.targets, minlength=10).tolist()
    assert counts == longtail_counts(500, 10, 100.0)
    assert counts[0] / counts[-1] >= 50
    assert len(train) == len(train.data) == sum(counts)
    assert train.data.shape[1:] == (32, 32, 3) and train.data.dtype == np.uint8
    assert len(train.classes) == len(set(train.classes)) == 10


def test_default_eval_splits_are_balanced(default_splits):
    assert np.bincount(default_splits["val"].targets).tolist() == [50] * 10
    assert np.bincount(default_splits["test"].targets).tolist() == [100] * 10


def test_items_are_rgb_images_with_int_labels(default_splits):
    test = default_splits["test"]
    img, label = test[137]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (32, 32)
    assert label == test.targets[137] and isinstance(label, int)
    assert np.array_equal(np.asarray(img), test.data[137])


def test_same_seed_same_bytes_other_seed_differs():
    a = SyntheticLongTailed("train", seed=3, **SMALL)
    b = SyntheticLongTailed("train", seed=3, **SMALL)
    c = SyntheticLongTailed("train", seed=4, **SMALL)
    assert a.data.tobytes() == b.data.tobytes() and a.targets == b.targets
    assert a.targets == c.targets and not np.array_equal(a.data, c.data)


def test_splits_are_distinct_streams():
    val = SyntheticLongTailed("val", **SMALL)
    test = SyntheticLongTailed("test", **SMALL)
    assert np.bincount(val.targets).tolist() == [4] * 5
    assert not np.array_equal(val.data, test.data[: len(val)])
    train = SyntheticLongTailed("train", **SMALL)
    train_bytes = {img.tobytes() for img in train.data}
    assert not any(img.tobytes() in train_bytes for img in test.data)


def test_images_are_not_trivial():
    data = SyntheticLongTailed("test", **SMALL)
    x = data.data.astype(np.float64)
    assert 20 < x.std() < 100  # textured, not flat
    per_image_std = x.reshape(len(x), -1).std(1)
    assert per_image_std.min() > 10
    # images of one class differ from each other (jittered parts, noise)
    same = x[np.array(data.targets) == 0]
    assert np.abs(same[0] - same[1]).mean() > 10


@pytest.mark.parametrize("num_classes", [2, 5, 10, 30, 100])
def test_classes_combine_shared_parts(num_classes):
    bank, layouts = _design(num_classes)
    assert len(layouts) == num_classes
    assert len({frozenset(map(tuple, cls)) for cls in layouts}) == num_classes
    assert all(2 <= len(cls) <= 4 for cls in layouts)
    for cls in layouts:
        parts = [p for p, _ in cls]
        assert len(set(parts)) == len(parts) and all(0 <= p < len(bank) for p in parts)
    head = max(1, num_classes // 2)
    head_parts = {p for cls in layouts[:head] for p, _ in cls}
    assert all(head_parts & {p for p, _ in cls} for cls in layouts[head:])
    uses = np.bincount([p for cls in layouts for p, _ in cls])
    assert uses[uses > 0].min() >= 2  # no part alone names a class


def test_other_sizes_and_bad_arguments():
    big = SyntheticLongTailed("val", num_classes=3, n_per_class_eval=2, image_size=64)
    assert big.data.shape == (3, 64, 64, 3)
    with pytest.raises(DataError, match="split"):
        SyntheticLongTailed("training")
    with pytest.raises(DataError, match="num_classes"):
        SyntheticLongTailed("train", num_classes=1)
    with pytest.raises(DataError, match="imbalance_ratio"):
        SyntheticLongTailed("train", imbalance_ratio=0.5)
