"""End-to-end runs of the command line on tiny generated data, and its error messages."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

import dscl
from dscl.cli import main
from dscl.data import SyntheticLongTailed, longtail_counts


def run_cli(*args):
    return main([str(a) for a in args])


def recomputed_test_accuracy(run_dir):
    """Overall and per-class top-1 (%) of the run's saved classifier on the synthetic test split,
    generated here from the TINY settings, predicted image by image from PIL images."""
    model = dscl.load(run_dir)
    test = SyntheticLongTailed("test", num_classes=5, n_max=60, imbalance_ratio=10, n_per_class_eval=10, seed=0)
    images, labels = zip(*(test[i] for i in range(len(test))))
    with torch.no_grad():
        preds = model(torch.stack([model.transform(image) for image in images])).argmax(1).tolist()
    correct = [p == y for p, y in zip(preds, labels)]
    per_class = [100.0 * sum(c for c, y in zip(correct, labels) if y == k) / labels.count(k) for k in range(5)]
    return 100.0 * sum(correct) / len(correct), per_class


@pytest.mark.parametrize("method", ["dscl+pbsd", "ce"])
def test_run_writes_everything(tmp_path, tiny_overrides, method):
    """Guards against (besides missing files or keys):
    - results.json's accuracies not those of the saved classifier on the test split (evaluated
      on the validation or training split, labels misaligned, a fraction instead of percent,
      or a classifier other than the one saved);
    - train_counts other than the long-tailed construction of the data.
    """
    out = tmp_path / "run"
    sets = [x for o in tiny_overrides + [f"method={method}"] for x in ("--set", o)]
    assert run_cli("run", "--out", out, *sets) == 0
    results = json.loads((out / "results.json").read_text())
    for key in ("method", "overall", "many", "medium", "few", "per_class", "train_counts"):
        assert key in results
    assert results["method"] == method
    assert len(results["per_class"]) == len(results["train_counts"]) == 5
    overall, per_class = recomputed_test_accuracy(out)
    assert results["overall"] == pytest.approx(overall) and results["per_class"] == pytest.approx(per_class)
    assert results["train_counts"] == longtail_counts(60, 5, 10) and results["test_images"] == 50
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["method"] == method and saved["pretrain"]["epochs"] == 2
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("stage,epoch")
    assert len(rows) == 1 + 2 + (0 if method == "ce" else 2)
    assert (out / "checkpoints" / "pretrain.pt").is_file()


def test_stage_commands_in_sequence(tmp_path, tiny_overrides):
    out = tmp_path / "run"
    sets = [x for o in tiny_overrides + ["method=scl"] for x in ("--set", o)]
    assert run_cli("pretrain", "--out", out, *sets) == 0
    assert not (out / "results.json").exists()
    assert run_cli("linear", "--out", out) == 0
    assert run_cli("evaluate", "--out", out) == 0
    assert json.loads((out / "results.json").read_text())["method"] == "scl"


def test_python_dash_m_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dscl", "run", "--out", str(tmp_path), "--set", "pretrain.epoch=3"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "pretrain.epoch" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("override, words", [
    ("pretrain.epochs=-1", "pretrain.epochs"),
    ("pretrain.alpha=1.5", "pretrain.alpha"),
    ("pretrain.queue_size=4", "pretrain.queue_size"),
    ("linear.epochs=ten", "linear.epochs"),
    ("data.nmae=x", "data.nmae"),
    ("method=moco", "method"),
    ("data.name=nosuchset", "nosuchset"),
])
def test_bad_config_is_one_clear_message(tmp_path, capsys, override, words):
    out = tmp_path / "run"
    assert run_cli("run", "--out", out, "--set", override) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert not (out / "results.json").exists()


def test_bad_yaml_file_names_file_and_key(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("pretrain:\n  epochs: 3\n  lerning_rate: 0.1\n")
    assert run_cli("run", "--config", recipe, "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "recipe.yaml" in err and "pretrain.lerning_rate" in err


def test_refuses_to_overwrite_or_resume_another_run(tmp_path, tiny_overrides, capsys):
    out = tmp_path / "run"
    sets = [x for o in tiny_overrides + ["method=dscl", "pretrain.epochs=1", "linear.epochs=1"] for x in ("--set", o)]
    assert run_cli("run", "--out", out, *sets) == 0
    before = (out / "results.json").read_bytes()
    assert run_cli("run", "--out", out, *sets) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert run_cli("run", "--out", out, "--resume", *sets,
                   "--set", "method=scl", "--set", "pretrain.queue_size=32") == 2
    err = capsys.readouterr().err
    assert "method: 'dscl' -> 'scl'" in err and "pretrain.queue_size: 24 -> 32" in err
    assert (out / "results.json").read_bytes() == before


@pytest.mark.parametrize("resume", [False, True])
def test_a_failed_start_does_not_block_the_corrected_rerun(tmp_path, tiny_overrides, capsys, resume):
    # Bug caught: a run that failed on a wrong data root left config.yaml, and the corrected
    # command into the same --out was refused ("already holds a run", or a resume differing in root).
    out = tmp_path / "run"
    sets = [x for o in tiny_overrides + ["method=ce"] for x in ("--set", o)]
    assert run_cli("run", "--out", out, *sets, "--set", "data.name=imagefolder",
                   "--set", f"data.root={tmp_path / 'WRONG'}") == 2
    assert "WRONG" in capsys.readouterr().err
    assert (out / "config.yaml").is_file() and not (out / "checkpoints").exists()
    assert run_cli("run", "--out", out, *sets, *(["--resume"] if resume else [])) == 0
    assert json.loads((out / "results.json").read_text())["method"] == "ce"
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["name"] == "synthetic"
