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
    rows = {r["run"]: r for r in map(json.loads, (folder / "cifar.jsonl").read_text().splitlines())}
    runs = ["ce", "dscl-pbsd"]  # the default list is checked below: running all five takes minutes here
    assert all(rows[r]["status"] == "exit 0" and 0 <= rows[r]["overall"] <= 100 for r in runs), rows
    adjusted = [r for r in rows if r.startswith("ce + posthoc-la (tau ")]
    assert len(adjusted) == 1 and rows[adjusted[0]]["few"] == rows[adjusted[0]]["few"]
    assert "| dscl-pbsd |" in (folder / "cifar.md").read_text() and (folder / "bench.md").is_file()
    with tarfile.open(folder / "runs.tar.gz") as tar:
        names = tar.getnames()
    assert all(f"runs/{r}/results.json" in names for r in runs) and not any("/checkpoints" in n for n in names)


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
