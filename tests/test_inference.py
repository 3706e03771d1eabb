"""A finished tiny run reused: dscl.load, `dscl predict`, `dscl evaluate RUN_DIR`, and the
messages for a foreign or damaged checkpoint."""

import hashlib
import json
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

import dscl
from dscl.cli import main
from dscl.data import SyntheticLongTailed
from dscl.engine.checkpoint import load_checkpoint, save_checkpoint

from conftest import TINY

SYNTHETIC = {"imbalance_ratio": 10, "num_classes": 5, "n_max": 60, "n_per_class_eval": 10, "seed": 0}


def run_cli(*args):
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("inference") / "run"
    sets = [x for o in TINY + ["method=dscl"] for x in ("--set", o)]
    assert run_cli("run", "--out", out, *sets) == 0
    return out


@pytest.fixture(scope="module")
def test_images(tmp_path_factory):
    """The run's test split as PNG files under root/{train,test}/<class>/ (an image folder)."""
    root = tmp_path_factory.mktemp("images")
    test = SyntheticLongTailed("test", **SYNTHETIC)
    for split in ("train", "test"):
        for i in range(len(test)):
            image, label = test[i]
            folder = root / split / test.classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{i:03d}.png")
    return root


def copy_run(run_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    return copy


def fingerprint(folder):
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_model_card_and_load(run_dir):
    card = json.loads((run_dir / "model.json").read_text())
    results = json.loads((run_dir / "results.json").read_text())
    assert card["dscl_version"] == dscl.__version__ and card["method"] == "dscl"
    assert card["classes"] == results["classes"] and card["image_size"] == 32 and len(card["mean"]) == 3
    assert card["train_counts"] == results["train_counts"] and card["stage2"] == results["stage2"]
    model = dscl.load(run_dir)
    assert model.classes == card["classes"] and not model.classifier.training
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 5)
    # the standardisation and the selected layer of linear_best.pt, not a fresh one
    best = load_checkpoint(run_dir / "checkpoints" / "linear_best.pt")
    assert torch.equal(model.classifier.fc.weight, best["fc"]["weight"])
    assert torch.equal(model.classifier.norm.std, best["norm"]["std"])


def test_old_run_without_model_card_loads_from_config_and_results(run_dir, tmp_path):
    old = copy_run(run_dir, tmp_path)
    (old / "model.json").unlink()
    model, reference = dscl.load(old), dscl.load(run_dir)
    images = torch.randn(4, 3, 32, 32)
    assert model.classes == reference.classes and model.image_size == 32 and model.mean == reference.mean
    assert torch.equal(model(images), reference(images))


def test_predict_names_and_skips_unreadable_files(run_dir, test_images, tmp_path, capsys):
    folder = tmp_path / "photos"
    shutil.copytree(test_images / "test", folder)
    (folder / "broken.jpg").write_bytes(b"not an image")
    files = sorted(p for p in folder.rglob("*.png"))
    assert run_cli("predict", run_dir, folder, tmp_path / "missing.png", "--format", "json", "--topk", "2") == 1
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert "broken.jpg" in captured.err and "missing.png" in captured.err and "Traceback" not in captured.err
    assert [r["image"] for r in rows] == [str(p) for p in files]
    model = dscl.load(run_dir)
    logits = model(torch.stack([model.transform(Image.open(p).convert("RGB"))
                                for p in files[:8]]))
    probs = logits.softmax(1)
    for row, p in zip(rows, probs):
        assert [t["class"] for t in row["top"]] == [model.classes[i] for i in p.topk(2).indices.tolist()]
        assert row["top"][0]["probability"] == pytest.approx(float(p.max()), abs=1e-6)
    assert run_cli("predict", run_dir, files[0], "--format", "csv", "--topk", "1") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "image,rank,class,index,probability" and lines[1].startswith(f"{files[0]},1,")
    assert run_cli("predict", run_dir, files[0]) == 0
    assert capsys.readouterr().out.splitlines()[0].split()[:3] == ["image", "top-1", "p"]


def test_predict_exits_non_zero_when_it_skipped_an_input(run_dir, test_images, tmp_path, capsys):
    """`dscl predict` returns 1 (and says so in --help) whenever any input was skipped, even when
    the others were predicted; 0 only when every input was.

    Guards against:
    - a skipped input reported on stderr only, with exit status 0 (a script would not notice);
    - a folder without images, or an unreadable file among readable ones, passing silently;
    - the exit status of `python -m dscl` not being the one `main` returns.
    """
    good = sorted(test_images.rglob("*.png"))[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    for inputs in ([good, broken], [good, empty], [broken]):
        assert run_cli("predict", run_dir, *inputs, "--format", "json") == 1, inputs
        captured = capsys.readouterr()
        assert len(json.loads(captured.out)) == (1 if good in inputs else 0)
        assert "1 input(s) skipped" in captured.err and str(inputs[-1]) in captured.err
    assert run_cli("predict", run_dir, good, good.parent) == 0
    capsys.readouterr()
    command = [sys.executable, "-m", "dscl", "predict", str(run_dir), str(good), str(tmp_path / "gone.png")]
    proc = subprocess.run(command, capture_output=True, text=True)
    assert proc.returncode == 1 and "gone.png" in proc.stderr and good.name in proc.stdout
    with pytest.raises(SystemExit) as info:
        main(["predict", "--help"])
    assert info.value.code == 0
    assert "1 when any input was skipped" in " ".join(capsys.readouterr().out.split())


def test_evaluate_other_split_and_data_writes_only_its_own_file(run_dir, test_images, capsys):
    before = fingerprint(run_dir)
    assert run_cli("evaluate", run_dir) == 0
    same = json.loads((run_dir / "evaluations" / "synthetic-test.json").read_text())
    assert same["overall"] == json.loads((run_dir / "results.json").read_text())["overall"]
    assert run_cli("evaluate", run_dir, "--data", test_images, "--results", run_dir.parent / "folder.json") == 0
    folder = json.loads((run_dir.parent / "folder.json").read_text())
    assert folder["data"]["name"] == "imagefolder" and folder["class_match"] == "same classes"
    assert folder["images"] == same["images"] and folder["overall"] == same["overall"]  # lossless PNG copies
    assert run_cli("evaluate", run_dir, "--split", "val") == 0
    val = json.loads((run_dir / "evaluations" / "synthetic-val.json").read_text())
    assert val["overall"] == json.loads((run_dir / "results.json").read_text())["val_top1"]
    after = fingerprint(run_dir)
    assert {k: v for k, v in after.items() if not k.startswith("evaluations")} == before
    assert run_cli("evaluate", run_dir, "--set", "method=ce") == 2
    assert "data.*" in capsys.readouterr().err


def _damage_foreign(path):
    state = load_checkpoint(path)
    state["config"]["method"] = "ce"
    save_checkpoint(path, state)


def _damage_truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("file, damage, words", [
    ("checkpoints/pretrain.pt", _damage_foreign, "different run"),
    ("checkpoints/linear_best.pt", _damage_truncate, "truncated"),
    ("model.json", _damage_truncate, "unreadable"),
])
def test_foreign_or_damaged_files_are_named(run_dir, tmp_path, capsys, file, damage, words):
    broken = copy_run(run_dir, tmp_path)
    damage(broken / file)
    with pytest.raises(dscl.CheckpointError, match=words):
        dscl.load(broken)
    for command in (["predict", broken, tmp_path], ["export", broken, "--format", "torchscript",
                                                     "--out", tmp_path / "m.pt"]):
        assert run_cli(*command) == 2
        err = capsys.readouterr().err
        assert str(broken / file) in err and words in err and "Traceback" not in err
