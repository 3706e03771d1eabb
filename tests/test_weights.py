"""Weights people can download with the code: ``dscl export --format run`` (a slim run folder)
and the folders published under ``src/dscl/weights``, loaded by name.

Guards against:
- a slim copy whose classifier differs from the run's (a wrong key prefix, the momentum encoder
  kept instead of the query encoder, the last stage-2 epoch instead of the kept one);
- a published file changed without its table row (sha256), or a results file whose per-class
  test accuracies the weights do not give (checked on four classes, head to tail, of the real
  test images where the archive is at hand);
- evaluating published weights writing into the installed package.
"""

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import dscl
from dscl.cli import main
from dscl.weights import FOLDER as WEIGHTS, published_names
from dscl.errors import CheckpointError, ConfigError
from dscl.export import export_run

from conftest import TINY

README = (WEIGHTS / "README.md").read_text()
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# name prefix of published weights -> (archive with the real test split, its test folder, classes)
TEST_SPLITS = {"tinyimagenet-lt-r100/": ("tinyimagenet32.tar.gz", "tinyimagenet32/test", 200),
               "cifar10-lt-r100/": ("cifar10-jpeg.tar.gz", "cifar10-jpeg/test", 10)}


def split_for(name: str) -> tuple[str, str, int]:
    return next(split for prefix, split in TEST_SPLITS.items() if name.startswith(prefix))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny two-stage contrastive run: stage 1 holds a key encoder, heads and a queue."""
    out = tmp_path_factory.mktemp("weights") / "run"
    sets = [x for o in TINY + ["method=dscl"] for x in ("--set", o)]
    assert main(["run", "--out", str(out), *sets]) == 0
    return out


def test_slim_copy_gives_the_runs_classifier_and_accuracy(run_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "slim"
    message = export_run(run_dir, out, data_root="data/elsewhere")
    assert str(out) in message and "dscl evaluate" in message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["linear_best.pt", "pretrain.pt"]
    stage1 = torch.load(out / "checkpoints" / "pretrain.pt", weights_only=False)
    full = torch.load(run_dir / "checkpoints" / "pretrain.pt", weights_only=False)
    assert stage1["model"] and all(k.startswith("encoder.") for k in stage1["model"])
    assert all(torch.equal(v, full["model"][k]) for k, v in stage1["model"].items())
    assert len(stage1["model"]) < len(full["model"])  # no key encoder, heads or queue
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["root"] == "data/elsewhere"
    assert stage1["config"]["data"]["root"] == "data/elsewhere"

    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(dscl.load(out)(images), dscl.load(run_dir)(images))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["evaluate", str(out), "--set", "data.root=null", "--results", "eval.json"]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())["overall"]
    assert evaluated == json.loads((run_dir / "results.json").read_text())["overall"]
    with pytest.raises(ConfigError, match="not empty"):
        export_run(run_dir, out)


def test_stage_2_again_from_exported_weights_or_a_run(run_dir, tmp_path, capsys):
    # Bug caught: slim weights (no epochs, no metrics) could not seed a stage 2, so users could
    # not run cRT or the logit-adjusted stage 2 on the published encoders.
    slim = tmp_path / "slim"
    export_run(run_dir, slim)
    keys = ("overall", "many", "medium", "few", "per_class")
    original = json.loads((run_dir / "results.json").read_text())
    for source in (slim, run_dir):  # nothing changed: the run's own stage 2 again, to the last digit
        out = tmp_path / f"again-{source.name}"
        assert main(["run", "--from", str(source), "--out", str(out)]) == 0
        again = json.loads((out / "results.json").read_text())
        assert {k: again[k] for k in keys} == {k: original[k] for k in keys}
        log = (out / "log.txt").read_text()
        assert f"stage 1 reused from {source}" in log and "stage=pretrain" not in log

    out = tmp_path / "loss"
    assert main(["linear", "--from", str(slim), "--out", str(out), "--set", "linear.rebalance=loss"]) == 0
    assert main(["evaluate", "--out", str(out)]) == 0
    state = torch.load(out / "checkpoints" / "pretrain.pt", weights_only=False)["model"]
    slim_state = torch.load(slim / "checkpoints" / "pretrain.pt", weights_only=False)["model"]
    assert state.keys() == slim_state.keys() and all(torch.equal(v, slim_state[k]) for k, v in state.items())
    assert json.loads((out / "results.json").read_text())["overall"] != original["overall"]

    capsys.readouterr()
    assert main(["run", "--from", str(slim), "--out", str(tmp_path / "other"), "--set", "seed=1",
                 "--set", "pretrain.epochs=3"]) == 2
    err = capsys.readouterr().err
    assert "its stage 1 is not the one asked for" in err and "seed: 0 -> 1" in err and "pretrain.epochs" in err
    assert not (tmp_path / "other").exists()


def test_unfinished_run_is_refused(run_dir, tmp_path):
    partial = tmp_path / "partial"
    (partial / "checkpoints").mkdir(parents=True)
    (partial / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    with pytest.raises(CheckpointError, match="pretrain.pt"):
        export_run(partial, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_name_lists_the_published_ones(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["predict", "tinyimagenet-lt-r100/nope", "x.png"]) == 2
    err = capsys.readouterr().err
    assert "no such run folder" in err and "tinyimagenet-lt-r100/crt" in err


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def row(name: str) -> str:
    rows = [line for line in README.splitlines() if line.startswith(f"| {name} |")]
    assert len(rows) == 1, f"{WEIGHTS / 'README.md'}: no single table row for {name}"
    return rows[0]


@pytest.mark.parametrize("name", published_names())
def test_published_weights_match_their_row(name):
    folder, line = WEIGHTS / name, row(name)
    files = sorted((folder / "checkpoints").iterdir())
    assert {p.name for p in files} <= {"pretrain.pt", "linear_best.pt"}
    assert all(f"{p.name} {sha256(p)}" in line for p in files)
    results = json.loads((folder / "results.json").read_text())
    cells = [c.strip() for c in line.strip("|").split("|")]
    groups = ["-" if results[k] is None else f"{results[k]:.1f}" for k in ("many", "medium", "few")]
    assert cells[2:6] == groups + [f"{results['overall']:.2f}"]
    text = "".join(p.read_text() for p in folder.iterdir() if p.is_file())
    assert not re.search(r"(^|[\s\"'])/(work|tmp|home|root|Users)/", text), f"{name}: a machine path in its files"
    model = dscl.load(name)
    assert len(model.classes) == split_for(name)[2] and model.image_size == 32 and model.card["method"] in line


def test_the_table_names_every_published_folder():
    listed = re.findall(r"^\| (\S+/\S+) \|", README, flags=re.M)
    assert listed == published_names() and listed


# Run in a fresh interpreter: per-class test top-1 of published weights on some classes of an
# image folder's test split (the forward pass over every test image took 20 to 45 s a model).
FRESH = r"""
import json, sys, torch, torchvision, dscl
name, root, kept = sys.argv[1], sys.argv[2], [int(c) for c in sys.argv[3].split(",")]
model = dscl.load(name)
data = torchvision.datasets.ImageFolder(root, transform=model.transform)
assert data.classes == model.classes, "class order"
data.samples = [(path, y) for path, y in data.samples if y in kept]
correct, total = torch.zeros(len(data.classes)), torch.zeros(len(data.classes))
for x, y in torch.utils.data.DataLoader(data, batch_size=500):
    total += torch.bincount(y, minlength=len(total))
    correct += torch.bincount(y[model(x).argmax(1) == y], minlength=len(total))
print(json.dumps({c: 100 * correct[c].item() / total[c].item() for c in kept}))
"""


@pytest.fixture(scope="module")
def real_test_splits(tmp_path_factory):
    """Each archive's test folder, extracted once, on first use."""
    into, folders = tmp_path_factory.mktemp("test-splits"), {}

    def extract(archive: str, folder: str) -> Path:
        if archive not in folders:
            subprocess.run(["tar", "xzf", str(SHARED / archive), "-C", str(into), folder], check=True)
            folders[archive] = into / folder
        return folders[archive]

    return extract


@pytest.mark.parametrize("name", published_names())
def test_published_weights_reproduce_their_test_accuracy_in_a_fresh_process(name, real_test_splits):
    archive, folder, num_classes = split_for(name)
    if not (SHARED / archive).is_file():
        pytest.skip(f"real-data test: no ../shared/data/{archive} beside the repository (CI has one; "
                    "see shared/data/README.md)")
    kept = sorted({0, num_classes // 3, 2 * num_classes // 3, num_classes - 1})  # head to tail
    proc = subprocess.run([sys.executable, "-c", FRESH, name, str(real_test_splits(archive, folder)),
                           ",".join(map(str, kept))], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    measured = json.loads(proc.stdout.splitlines()[-1])
    expected = json.loads((WEIGHTS / name / "results.json").read_text())["per_class"]
    assert [measured[str(c)] for c in kept] == pytest.approx([expected[c] for c in kept], abs=1e-9)
