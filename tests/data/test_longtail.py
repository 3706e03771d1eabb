"""Long-tailed construction: counts, the LDAM-DRW selection, shot groups, held-out validation."""

import numpy as np
import pytest

from dscl.data import holdout_indices, longtail_counts, longtail_indices, shot_groups


def ldam_reference(targets, img_num_per_cls):
    """Literal copy of the LDAM-DRW loop (IMBALANCECIFAR10.gen_imbalanced_data)."""
    np.random.seed(0)
    new_idx = []
    targets_np = np.array(targets, dtype=np.int64)
    classes = np.unique(targets_np)
    for the_class, the_img_num in zip(classes, img_num_per_cls):
        idx = np.where(targets_np == the_class)[0]
        np.random.shuffle(idx)
        new_idx.extend(idx[:the_img_num].tolist())
    return new_idx


def cifar_like_targets(num_classes, per_class, seed=1):
    rng = np.random.default_rng(seed)
    return rng.permutation(np.repeat(np.arange(num_classes), per_class)).tolist()


@pytest.mark.parametrize(
    "n_max, num_classes, rho, total",
    [(5000, 10, 100, 12406), (5000, 10, 50, 13996), (5000, 10, 10, 20431),
     (500, 100, 100, 10847), (500, 100, 50, 12608), (500, 100, 10, 19573)],
)
def test_counts_match_published_cifar_lt_totals(n_max, num_classes, rho, total):
    counts = longtail_counts(n_max, num_classes, rho)
    assert sum(counts) == total
    assert counts[0] == n_max and counts[-1] == int(n_max / rho)
    assert all(a >= b for a, b in zip(counts, counts[1:]))


def test_counts_formula_and_edge_cases():
    assert longtail_counts(100, 3, 4.0) == [100, 50, 25]
    assert longtail_counts(7, 4, 1.0) == [7, 7, 7, 7]
    assert longtail_counts(9, 1, 10.0) == [9]
    with pytest.raises(ValueError):
        longtail_counts(100, 3, 0.5)


@pytest.mark.parametrize("num_classes, per_class, rho", [(10, 5000, 100), (100, 500, 100),
                                                         (7, 40, 10)])
def test_indices_equal_the_ldam_loop(num_classes, per_class, rho):
    targets = cifar_like_targets(num_classes, per_class)
    counts = longtail_counts(per_class, num_classes, rho)
    got = longtail_indices(targets, counts, seed=0)
    assert got == ldam_reference(targets, counts)
    assert np.bincount(np.array(targets)[got], minlength=num_classes).tolist() == counts


def test_indices_leave_global_numpy_state_alone_and_depend_on_seed():
    targets = cifar_like_targets(4, 30)
    counts = [30, 12, 5, 2]
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    a = longtail_indices(targets, counts, seed=0)
    assert np.random.rand() == expected
    b = longtail_indices(targets, counts, seed=1)
    assert sorted(a) != sorted(b)


def test_indices_without_shuffle_and_short_classes():
    targets = [2, 0, 1, 0, 2, 0, 1, 2, 2]
    assert longtail_indices(targets, [2, 1, 3], shuffle=False) == [1, 3, 2, 0, 4, 7]
    # class 1 has 2 images but 5 requested: both are kept
    got = longtail_indices(targets, [0, 5, 1])
    assert sorted(got[:2]) == [2, 6] and targets[got[2]] == 2 and len(got) == 3
    with pytest.raises(ValueError):
        longtail_indices(targets, [1, 1])  # label 2 has no count


def test_shot_groups_boundaries():
    counts = [101, 100, 20, 19, 0, 5000, 1, 21, 99]
    assert shot_groups(counts) == ["many", "medium", "medium", "few", "few", "many", "few",
                                   "medium", "medium"]


def test_holdout_takes_left_out_images_first():
    targets = cifar_like_targets(5, 40, seed=3)
    counts = longtail_counts(40, 5, 10)  # [40, 22, 12, 7, 4]
    kept = longtail_indices(targets, counts)
    train, val = holdout_indices(targets, kept, val_per_class=6, seed=0)
    y = np.array(targets)
    assert np.bincount(y[val], minlength=5).tolist() == [6] * 5
    assert not set(train) & set(val)
    # the head class kept every image: its 6 come out of the LT subset
    assert np.bincount(y[train], minlength=5).tolist() == [34, 22, 12, 7, 4]
    assert all(i in kept for i in val if y[i] == 0)
    assert not any(i in kept for i in val if y[i] != 0)
    assert train == [i for i in kept if i in set(train)]  # order of the LT subset kept
    again = holdout_indices(targets, kept, val_per_class=6, seed=0)
    assert again == (train, val)
    assert holdout_indices(targets, kept, val_per_class=6, seed=1)[1] != val


def test_holdout_refuses_to_empty_a_class():
    targets = [0] * 5 + [1] * 3
    with pytest.raises(ValueError, match="class 1"):
        holdout_indices(targets, list(range(8)), val_per_class=3)
