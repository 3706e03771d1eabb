import pytest
import torch

from dscl.engine import accuracy_report


def test_groups_on_hand_made_predictions():
    train_counts = [500, 101, 100, 20, 19, 1]  # many, many, medium, medium, few, few
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    preds = torch.tensor([0, 0, 1, 0, 2, 0, 0, 0, 4, 4, 0, 5])
    # per class: 100, 50, 50, 0, 100, 50
    report = accuracy_report(preds, labels, train_counts)
    assert report["per_class"] == [100.0, 50.0, 50.0, 0.0, 100.0, 50.0]
    assert report["many"] == pytest.approx(75.0)
    assert report["medium"] == pytest.approx(25.0)
    assert report["few"] == pytest.approx(75.0)
    assert report["overall"] == pytest.approx(100 * 7 / 12)


def test_empty_group_is_absent_not_zero():
    report = accuracy_report(torch.tensor([0, 1]), torch.tensor([0, 1]), [500, 300])
    assert report["many"] == 100.0 and report["medium"] is None and report["few"] is None
