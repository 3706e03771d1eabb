"""`dscl sweep`: grid x seeds, resumable, summaries rebuilt from the run folders."""

import csv
import json
import subprocess
import sys

import pytest
from PIL import Image

import dscl.engine
from dscl.cli import main
from dscl.errors import ConfigError
from dscl.sweep import parse_grid


def sweep_args(out, tiny_overrides, *grid):
    sets = [x for o in tiny_overrides + ["pretrain.knn_every=0"] for x in ("--set", o)]
    return ["sweep", *sets, *[x for g in grid for x in ("--grid", g)], "--seeds", "0", "1", "--out", str(out),
            "--select", "val"]


def test_two_by_two_grid_two_seeds_then_a_second_call_runs_nothing(tmp_path, tiny_overrides, monkeypatch, capsys):
    """Guards against (besides re-running finished runs, reusing another configuration's):
    - a summary mean or ± not that of the seeds' results.json (population std, a seed left out);
    - --select val marking a row whose validation accuracy is not the best.
    """
    out = tmp_path / "sweep"
    args = sweep_args(out, tiny_overrides, "method=ce,scl", "linear.lr=0.05,0.02")
    assert main(args) == 0
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["combination"] for r in rows] == ["method=ce,linear.lr=0.05", "method=ce,linear.lr=0.02",
                                                "method=scl,linear.lr=0.05", "method=scl,linear.lr=0.02"]
    assert all(r["runs"] == "2" for r in rows)
    assert all(len(r[c].partition(".")[2]) <= 3 for r in rows for c in ("overall", "overall_std", "train_s"))
    for r in rows:  # mean and sample std (n - 1) of the two seeds' results.json, recomputed here
        folder = out / r["combination"].replace("=", "-").replace(",", "_")
        overall = [json.loads((folder / f"seed{s}" / "results.json").read_text())["overall"] for s in (0, 1)]
        assert float(r["overall"]) == pytest.approx(sum(overall) / 2, abs=1e-3)
        assert float(r["overall_std"]) == pytest.approx(abs(overall[0] - overall[1]) / 2 ** 0.5, abs=1e-3)
    selected = [r for r in rows if r["selected"] == "True"]
    assert len(selected) == 1 and float(selected[0]["val_top1"]) == max(float(r["val_top1"]) for r in rows)
    table = (out / "summary.md").read_text()
    assert table.count("±") >= 4 * 4 and table.count("\n| method=") == 4
    # stage 1 of the second linear.lr is copied, not trained again
    assert "stage 1 reused from" in (out / "method-scl_linear.lr-0.02" / "seed1" / "log.txt").read_text()
    with Image.open(out / "per_class.png") as image:
        assert image.format == "PNG" and image.size[0] > 100

    def must_not_run(*a, **k):
        raise AssertionError("a finished run was started again")

    monkeypatch.setattr(dscl.engine, "run", must_not_run)
    before = (out / "summary.csv").read_text()
    assert main(args) == 0
    assert (out / "summary.csv").read_text() == before
    # the same folders asked for with another --set hold another run: refused, not reused
    other = sweep_args(out, tiny_overrides + ["pretrain.temperature=0.2"], "method=ce,scl", "linear.lr=0.05,0.02")
    capsys.readouterr()
    assert main(other) != 0
    assert "holds a run of another configuration" in capsys.readouterr().err
    assert (out / "summary.csv").read_text() == before
    # a later grid under the same --out that changes only stage 2 reuses those stage-1 runs, also
    # when the data has moved since (data.root; the synthetic set is the same anywhere)
    monkeypatch.undo()
    moved = tiny_overrides + ["data.root=moved"]
    assert main(sweep_args(out, moved, "method=scl", "linear.augment=false")) == 0
    log = (out / "method-scl_linear.augment-false" / "seed0" / "log.txt").read_text()
    assert "stage 1 reused from" in log and "stage=pretrain" not in log
    # and a run killed before its results goes on where its data now is
    (out / "method-scl_linear.augment-false" / "seed1" / "results.json").unlink()
    assert main(sweep_args(out, moved, "method=scl", "linear.augment=false")) == 0
    assert (out / "method-scl_linear.augment-false" / "seed1" / "results.json").is_file()


def test_a_failed_run_is_recorded_and_not_retried(tmp_path, tiny_overrides, monkeypatch):
    out = tmp_path / "sweep"
    args = sweep_args(out, tiny_overrides, "method=scl", "linear.lr=1000")
    assert main(args) == 0
    error = (out / "method-scl_linear.lr-1000" / "seed0" / "error.txt").read_text()
    assert "linear.lr" in error
    assert "2 failed" in (out / "summary.md").read_text()
    monkeypatch.setattr(dscl.engine, "run", lambda *a, **k: pytest.fail("a failed run was retried"))
    assert main(args) == 0


def test_a_folder_of_another_configuration_is_refused(tmp_path, tiny_overrides, capsys):
    out = tmp_path / "sweep"
    assert main(sweep_args(out, tiny_overrides, "method=ce") + ["--summary-only"]) == 0  # nothing run
    (out / "method-ce" / "seed0").mkdir(parents=True)
    (out / "method-ce" / "seed0" / "config.yaml").write_text("method: ce\nseed: 0\npretrain:\n  epochs: 99\n")
    assert main(sweep_args(out, tiny_overrides, "method=ce")) == 2
    assert "pretrain.epochs" in capsys.readouterr().err


@pytest.mark.parametrize("grid, words", [(["method"], "expected key=value"), (["method=ce,"], "empty value"),
                                         (["method=ce", "method=scl"], "twice")])
def test_bad_grids_are_refused(grid, words):
    with pytest.raises(ConfigError, match=words):
        parse_grid(grid)


def test_list_values_keep_their_brackets():
    assert parse_grid(["linear.milestones=[2,3],[4]"]) == [("linear.milestones", ["[2,3]", "[4]"])]


def test_a_run_held_by_a_live_process_is_left_alone(tmp_path, tiny_overrides, monkeypatch):
    out = tmp_path / "sweep"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / "method-ce").mkdir(parents=True)
        (out / "method-ce" / "seed0.lock").write_text(str(holder.pid))
        (out / "method-ce" / "seed1.lock").write_text("999999999")  # a dead owner: taken over
        ran = []
        monkeypatch.setattr(dscl.engine, "run", lambda cfg, path, rt, **k: ran.append(path.name))
        assert main(sweep_args(out, tiny_overrides, "method=ce")) == 0
        assert ran == ["seed1"]
        assert (out / "method-ce" / "seed0.lock").is_file() and not (out / "method-ce" / "seed1.lock").exists()
    finally:
        holder.kill()
        holder.wait()


def test_table1_layout_every_variant_and_a_curve_end_to_end(tmp_path, tiny_overrides):
    out = tmp_path / "ablations"
    fast = ["pretrain.knn_every=0", "pretrain.epochs=1", "pretrain.warmup_epochs=0", "linear.augment=false",
            "linear.epochs=1", "linear.milestones=[]"]  # nine runs: one epoch of each stage is enough here
    sets = [x for o in tiny_overrides + fast for x in ("--set", o)]
    common = ["sweep", *sets, "--seeds", "0", "--out", str(out)]
    assert main(common + ["--layout", "table1"]) == 0
    rows = list(csv.DictReader((out / "table1.csv").open()))
    assert [r["combination"] for r in rows] == ["SCL (baseline)", "DSCL", "SCL + PBSD",
                                                "DSCL + PBSD* (global-view teacher)",
                                                "DSCL + PBSD† (multi-crop instead)", "DSCL + PBSD"]
    assert all(r["runs"] == "1" and r["failed"] == "0" for r in rows)
    assert [float(r["paper_overall"]) for r in rows] == [51.2, 52.6, 56.3, 56.2, 56.1, 57.7]
    header = (out / "method-dscl-pbsd_pretrain.patch_mode-multicrop" / "seed0"
              / "metrics.csv").read_text().splitlines()[0]
    assert "multicrop" in header.split(",") and "pbsd" not in header.split(",")
    table = (out / "table1.md").read_text()
    (out / "table1.md").unlink()
    assert main(common + ["--layout", "table1", "--summary-only"]) == 0  # rebuilt from the run folders alone
    assert (out / "table1.md").read_text() == table
    # the remaining variants together, and a one-key grid that draws a curve
    assert main(common + ["--set", "method=dscl+pbsd", "--grid", "pretrain.queue_sampling=balanced",
                          "--grid", "pretrain.reweight=effective_number", "--grid", "pretrain.patch_scale=[1.0,1.0]",
                          "--grid", "data.profile=pareto"]) == 0
    assert list(csv.DictReader((out / "summary.csv").open()))[0]["failed"] == "0"
    assert main(common + ["--set", "method=dscl", "--grid", "pretrain.alpha=0,1"]) == 0
    curve = list(csv.DictReader((out / "curve.csv").open()))
    assert [float(r["pretrain.alpha"]) for r in curve] == [0.0, 1.0] and all(r["overall"] for r in curve)
    with Image.open(out / "curve.png") as image:
        assert image.format == "PNG"


def test_a_folder_written_before_a_key_existed_is_the_same_run(tmp_path, tiny_overrides):
    # keys added to dscl later take their defaults; logging.* never makes another run
    from dscl.config import load_config
    from dscl.files import write_yaml
    from dscl.sweep import _check_same

    old = load_config(None, tiny_overrides).to_dict()
    del old["logging"], old["pretrain"]["pbsd_teacher"]
    write_yaml(tmp_path / "config.yaml", old)
    _check_same(tmp_path, load_config(None, tiny_overrides + ["logging.tensorboard=true"]).to_dict())
    with pytest.raises(ConfigError, match="pretrain.pbsd_teacher"):
        _check_same(tmp_path, load_config(None, tiny_overrides + ["pretrain.pbsd_teacher=global"]).to_dict())


def test_the_dscl_weight_makes_another_run_only_for_the_dscl_methods(tmp_path, tiny_overrides):
    # a recipe's alpha can change without orphaning its finished ce and scl runs
    from dscl.config import load_config
    from dscl.files import write_yaml
    from dscl.sweep import _check_same

    for method in ("ce", "scl", "scl+pbsd", "dscl", "dscl+pbsd"):
        write_yaml(tmp_path / "config.yaml", load_config(None, tiny_overrides + [f"method={method}"]).to_dict())
        now = load_config(None, tiny_overrides + [f"method={method}", "pretrain.alpha=0.3"]).to_dict()
        if method.startswith("dscl"):
            with pytest.raises(ConfigError, match="pretrain.alpha"):
                _check_same(tmp_path, now)
        else:
            _check_same(tmp_path, now)


def _finished_run(folder, overall, val_top1):
    """A finished run folder as ``dscl run`` leaves it, as far as the summary reads it."""
    folder.mkdir(parents=True)
    results = {"method": "dscl", "overall": overall, "many": overall, "medium": None, "few": overall - 10,
               "val_top1": val_top1, "per_class": [overall, overall], "train_counts": [500, 5], "train_s": 1.0}
    (folder / "results.json").write_text(json.dumps(results))


def test_select_val_marks_the_best_validation_row_not_the_best_test_row(tmp_path):
    """The row chosen by --select val is the one with the best mean validation accuracy, even
    where another row has a better test accuracy; the ± is the sample standard deviation.

    Guards against:
    - `--select val` picking the row with the best test (overall) accuracy, or the first / last row;
    - the ± and overall_std computed as the population std (n) instead of the sample std (n - 1).
    """
    out = tmp_path / "sweep"
    # (test overall, validation) per seed: lr 0.1 validates best, lr 0.2 tests best, lr 0.3 is worst on both
    runs = {"0.1": [(60.0, 81.0), (64.0, 79.0)], "0.2": [(90.0, 70.0), (86.0, 72.0)],
            "0.3": [(50.0, 60.0), (51.0, 61.0)]}
    for lr, seeds in runs.items():
        for seed, (overall, val) in enumerate(seeds):
            _finished_run(out / f"linear.lr-{lr}" / f"seed{seed}", overall, val)
    assert main(["sweep", "--grid", "linear.lr=0.1,0.2,0.3", "--seeds", "0", "1", "--out", str(out),
                 "--select", "val", "--summary-only"]) == 0
    rows = {r["combination"]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert [name for name, r in rows.items() if r["selected"] == "True"] == ["linear.lr=0.1"]
    assert float(rows["linear.lr=0.2"]["overall"]) == 88.0  # the best test row, not selected
    # sample std of (60, 64): sqrt(((60-62)^2 + (64-62)^2) / (2 - 1)) = 2.828; the population std would be 2.0
    assert float(rows["linear.lr=0.1"]["overall_std"]) == pytest.approx(8 ** 0.5, abs=1e-3)
    assert float(rows["linear.lr=0.3"]["val_top1_std"]) == pytest.approx(0.5 ** 0.5, abs=1e-3)
    table = (out / "summary.md").read_text()
    assert "| linear.lr=0.1 *" in table and "| linear.lr=0.2 *" not in table
    assert "62.0 ± 2.8" in table


def test_sample_std_over_three_seeds_in_the_csv_and_the_table(tmp_path):
    """overall_std pinned on known values over three seeds.

    Guards against:
    - population std (divide by n) instead of the sample std (n - 1): 4.497 instead of 5.508;
    - a std over the wrong runs (one seed left out, or the validation column).
    """
    out = tmp_path / "sweep"
    for seed, overall in enumerate([1.0, 2.0, 11.0]):
        _finished_run(out / "method-dscl" / f"seed{seed}", overall, 50.0)
    assert main(["sweep", "--grid", "method=dscl", "--seeds", "0", "1", "2", "--out", str(out), "--summary-only"]) == 0
    row = next(csv.DictReader((out / "summary.csv").open()))
    values = [1.0, 2.0, 11.0]
    mean = sum(values) / 3
    sample = (sum((v - mean) ** 2 for v in values) / (3 - 1)) ** 0.5  # 5.508
    assert row["runs"] == "3" and float(row["overall"]) == pytest.approx(mean, abs=1e-3)
    assert float(row["overall_std"]) == pytest.approx(sample, abs=1e-3)
    assert float(row["val_top1_std"]) == 0.0
    assert f"{mean:.1f} ± {sample:.1f}" in (out / "summary.md").read_text()


def _summary_without_times(out):
    """summary.csv rows and summary.md lines without the training times, which differ run to run."""
    rows = [{k: v for k, v in r.items() if not k.startswith("train_s")}
            for r in csv.DictReader((out / "summary.csv").open())]
    table = [line.rsplit("|", 2)[0] if line.startswith("| ") else line
             for line in (out / "summary.md").read_text().splitlines()]
    return rows, table


def test_jobs_two_gives_the_summary_of_one_run_after_another(tmp_path, tiny_overrides, monkeypatch):
    """Guards against: --jobs 2 leaving a run out, running one twice, running them in the calling
    process, or changing a result (a stage 1 trained again because its sibling's was not finished
    yet, a failed run not recorded as failed)."""
    def args(out):  # two runs, seed 0: lr 1000 fails in stage 2; one after another it reuses lr 0.05's stage 1
        args = sweep_args(out, tiny_overrides, "method=scl", "linear.lr=0.05,1000")
        seeds = args.index("--seeds")
        return args[:seeds + 1] + ["0"] + args[seeds + 3:]

    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    assert main(args(serial)) == 0
    monkeypatch.setattr(dscl.engine, "run", lambda *a, **k: pytest.fail("a run trained in the parent process"))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the total the two workers share
    assert main(args(parallel) + ["--jobs", "2"]) == 0
    rows, table = _summary_without_times(parallel)
    assert (rows, table) == _summary_without_times(serial)
    assert [r["runs"] for r in rows] == ["1", "0"] and [r["failed"] for r in rows] == ["0", "1"]
    assert not list(parallel.glob("*/*.lock"))
    for run in parallel.glob("*/seed*/"):  # each run once, by one worker
        assert (run / "log.txt").read_text().count("] data synthetic:") == 1


def test_a_failed_worker_is_named(tmp_path, tiny_overrides, monkeypatch, capsys):
    from dscl import sweep

    monkeypatch.setattr(sweep, "worker_command", lambda *a: [sys.executable, "-c", "import sys; sys.exit(3)"])
    assert main(sweep_args(tmp_path / "sweep", tiny_overrides, "method=ce") + ["--jobs", "2"]) == 2
    err = capsys.readouterr().err
    assert "worker 1 (pid" in err and "worker 2 (pid" in err and "exited with status 3" in err
    assert not (tmp_path / "sweep" / "summary.md").exists()
    assert main(sweep_args(tmp_path / "sweep", tiny_overrides, "method=ce") + ["--jobs", "0"]) == 2


def test_the_threads_are_split_between_the_jobs(monkeypatch):
    from dscl.sweep import threads_per_job

    monkeypatch.setenv("OMP_NUM_THREADS", "16")
    assert [threads_per_job(n) for n in (1, 2, 3, 16, 32)] == [16, 8, 5, 1, 1]
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert threads_per_job(1) >= 1 and threads_per_job(10_000) == 1
