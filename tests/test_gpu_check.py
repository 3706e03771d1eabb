"""``benchmarks/gpu.sh --smoke``: the prepared GPU check runs end to end on a CPU, on a fake
CIFAR-10 tree, and leaves every table it promises under OUT/<device name>.

Guards against: a GPU session spent on a script that fails after the first bench line (a
renamed option, a default run list naming a method that no longer exists, a table reading a
results key that moved), or that writes its figures where no one looks for them.
"""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_gpu_check_smoke_on_a_fake_cifar_tree(tmp_path):
    cifar = tmp_path / "cifar10-jpeg"
    for c, name in enumerate(CLASSES):
        for split, n in (("train", 24), ("test", 3)):
            (cifar / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (32, 32), (25 * c, 60 + i, 200 - 15 * c)).save(cifar / split / name / f"{i}.jpg")
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(out), str(cifar), "--smoke",
                           "--bench-cases", "0", "--run", "ce", "--run", "dscl+pbsd"],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = out / "cpu"  # no GPU here: the device's name is "cpu"
    assert json.loads((folder / "env.json").read_text())["gpu"] is None
    bench = [json.loads(line) for line in (folder / "bench.jsonl").read_text().splitlines()]
    assert len(bench) == 1 and all("error" not in b and b["images_per_s"] > 0 for b in bench), bench
    rows = {r["run"]: r for r in map(json.loads, (folder / "runs.jsonl").read_text().splitlines())}
    runs = ["ce", "dscl-pbsd"]  # the default list is checked below: running all five takes minutes here
    assert all(rows[r]["status"] == "exit 0" and 0 <= rows[r]["overall"] <= 100 for r in runs), rows
    adjusted = [r for r in rows if r.startswith("ce + posthoc-la (tau ")]
    assert len(adjusted) == 1 and rows[adjusted[0]]["few"] == rows[adjusted[0]]["few"]
    assert "| dscl-pbsd |" in (folder / "runs.md").read_text() and (folder / "bench.md").is_file()
    with tarfile.open(folder / "runs.tar.gz") as tar:
        names = tar.getnames()
    assert all(f"runs/{r}/results.json" in names for r in runs) and not any("/checkpoints" in n for n in names)


def test_gpu_check_runs_another_recipe_from_an_archive(tmp_path):
    """``--recipe`` and ``--data`` with an archive: Imagenette-LT's runs (per-image path, 128-px
    views, its val/ folder as the test split), two seeds of one method, no bench line.

    Guards against: the runs taking the CIFAR recipe whatever --recipe says; an archive whose
    folder is not found unless it holds CIFAR's class names; the on-device path forced on a
    recipe whose images it refuses; two seeds of one method writing to one run folder."""
    tree = tmp_path / "imagenette2-224"
    for c in range(10):
        for split, n in (("train", 12), ("val", 2)):
            (tree / split / f"n{c:08d}").mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (48, 48), (25 * c, 60 + i, 200 - 15 * c)).save(tree / split / f"n{c:08d}" / f"{i}.jpg")
    with tarfile.open(tmp_path / "imagenette.tar.gz", "w:gz") as tar:
        tar.add(tree, arcname="imagenette2-224")
    out = tmp_path / "out"
    recipe = ROOT / "configs" / "dscl-pbsd_resnet18_b128-cos-30e_imagenette-lt-r100.yaml"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(out), str(tmp_path / "imagenette.tar.gz"),
                           "--smoke", "--recipe", str(recipe), "--bench-cases", "", "--set", "data.image_size=32",
                           "--set", "pretrain.patch_size=16", "--run", "dscl+pbsd", "--run", "dscl+pbsd:seed=1"],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "cpu" / "runs.jsonl").read_text().splitlines()]
    assert [r["run"] for r in rows if "posthoc" not in r["run"]] == ["dscl-pbsd", "dscl-pbsd_seed-1"]
    assert all(r["status"] == "exit 0" and r["epochs_done"] == 1 for r in rows), rows
    assert all("--config configs/dscl-pbsd_resnet18_b128-cos-30e_imagenette-lt-r100.yaml" in r["command"]
               and "data.root=DATA" in r["command"] for r in rows)
    with tarfile.open(out / "cpu" / "runs.tar.gz") as tar:
        config = tar.extractfile("runs/dscl-pbsd_seed-1/config.yaml").read().decode()
    assert "seed: 1" in config and "pipeline: pil" in config and "test_folder: val" in config


def test_default_runs_are_methods_and_the_strongest_baseline_is_among_them():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from dscl.methods import METHODS

    assert set(gpu_check.DEFAULT_RUNS) <= set(METHODS)
    assert {"ce", "ce-la", "scl", "dscl", "dscl+pbsd"} <= set(gpu_check.DEFAULT_RUNS)  # ce gives ce + post-hoc LA
    assert gpu_check.device_folder({"gpu": "NVIDIA H100 80GB HBM3"}) == "nvidia-h100-80gb-hbm3"
