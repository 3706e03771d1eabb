"""`dscl demo` end to end, on a tiny budget."""

import json

import pytest

from dscl.cli import main


def group_mean(per_class, train_counts, keep):
    values = [a for a, n in zip(per_class, train_counts) if keep(n)]
    return sum(values) / len(values) if values else None


def test_demo_prints_one_row_per_method(tmp_path, tiny_overrides, capsys):
    """Every number of the demo's table is the one its run folder holds, and those are what the
    run's per-class accuracies give (SPEC section 6: Many > 100, Medium 20..100, Few < 20
    training images; a balanced test split, so overall is the mean of the classes).

    Guards against:
    - a table row showing another method's run, or columns swapped (e.g. Few under Many, val
      under Overall);
    - a number rounded or copied wrong between results.json and the table;
    - results.json's group or overall figures not those of its own per-class accuracies.
    """
    sets = [x for o in tiny_overrides + ["pretrain.knn_every=1"] for x in ("--set", o)]
    assert main(["demo", "--out", str(tmp_path), "--methods", "ce", "dscl", *sets]) == 0
    printed = capsys.readouterr().out
    table = (tmp_path / "summary.md").read_text()
    assert table.splitlines()[0].startswith("| method | Many | Medium | Few | Overall | val |")
    assert table.strip() in printed
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in table.splitlines()[2:]]
    assert [row[0] for row in rows] == ["ce", "dscl"]
    for row in rows:
        results = json.loads((tmp_path / row[0] / "results.json").read_text())
        assert results["method"] == row[0]
        expected = [results[k] for k in ("many", "medium", "few", "overall", "val_top1")]
        assert row[1:6] == ["-" if v is None else f"{v:.1f}" for v in expected]
        per_class, counts = results["per_class"], results["train_counts"]
        assert results["overall"] == pytest.approx(sum(per_class) / len(per_class))
        assert results["many"] == group_mean(per_class, counts, lambda n: n > 100)
        assert results["medium"] == pytest.approx(group_mean(per_class, counts, lambda n: 20 <= n <= 100))
        assert results["few"] == pytest.approx(group_mean(per_class, counts, lambda n: n < 20))
        assert results["val_top1"] is not None
