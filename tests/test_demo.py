"""`dscl demo` end to end, on a tiny budget."""

from dscl.cli import main


def test_demo_prints_one_row_per_method(tmp_path, tiny_overrides, capsys):
    sets = [x for o in tiny_overrides + ["pretrain.knn_every=1"] for x in ("--set", o)]
    assert main(["demo", "--out", str(tmp_path), "--methods", "ce", "dscl", *sets]) == 0
    printed = capsys.readouterr().out
    table = (tmp_path / "summary.md").read_text()
    assert table.splitlines()[0].startswith("| method | Many | Medium | Few | Overall | val |")
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == ["ce", "dscl"]
    assert table.strip() in printed
    for method in ("ce", "dscl"):
        assert (tmp_path / method / "results.json").is_file()
