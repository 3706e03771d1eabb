"""Plots of every run, written at the end of ``dscl run``."""

from PIL import Image

from dscl.analysis.plots import plot_finished_run, plot_run, read_metrics


def test_a_finished_run_holds_its_plots(scl_run, ce_run):
    for run in (scl_run, ce_run):
        for name in ("per_class.png", "curves.png"):
            assert Image.open(run / name).format == "PNG", name
        assert "plots: per_class.png, curves.png" in (run / "log.txt").read_text()


def test_metrics_rows_keep_numbers_and_drop_empty_cells(tmp_path):
    (tmp_path / "metrics.csv").write_text("stage,epoch,lr,loss,knn_top1,val_top1\n"
                                          "pretrain,1,0.1,5.5,,\npretrain,2,0.05,5.0,30.0,\nlinear,1,0.3,1.2,,40.0\n")
    rows = read_metrics(tmp_path)
    assert rows[0] == {"stage": "pretrain", "epoch": 1.0, "lr": 0.1, "loss": 5.5}
    assert rows[1]["knn_top1"] == 30.0 and rows[2]["val_top1"] == 40.0
    assert [p.name for p in plot_run(tmp_path)] == ["curves.png"]  # no results.json: no per-class plot


def test_a_failure_to_plot_is_logged_and_never_raised(tmp_path):
    # Bug caught: a broken plot (unreadable results, a matplotlib error) failing a finished run.
    (tmp_path / "results.json").write_text("{not json")
    plot_finished_run(tmp_path)
    assert "plots not written (JSONDecodeError" in (tmp_path / "log.txt").read_text()
