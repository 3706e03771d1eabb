"""A run killed with SIGKILL at an arbitrary point and resumed ends exactly as one left alone."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dscl.cli import main

ACCURACY_KEYS = ("overall", "many", "medium", "few", "per_class")


def sets(overrides):
    return [x for o in overrides for x in ("--set", o)]


def kill_at_some_point(out: Path, overrides, rng, targets) -> None:
    """Start the run in a subprocess; SIGKILL it soon after its first mid-run checkpoint."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "dscl", "run", "--out", str(out), *sets(overrides)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = out / "checkpoints" / rng.choice(targets)
    deadline = time.time() + 120
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("method", ["dscl+pbsd", "ce"])
def test_killed_and_resumed_run_matches_uninterrupted(tmp_path, tiny_overrides, method):
    overrides = tiny_overrides + [f"method={method}", "checkpoint_every_steps=1", "pretrain.epochs=3"]
    assert main(["run", "--out", str(tmp_path / "alone"), *sets(overrides)]) == 0
    alone = json.loads((tmp_path / "alone" / "results.json").read_text())

    out = tmp_path / "killed"
    targets = ["pretrain_last.pt"] + ([] if method == "ce" else ["linear_last.pt"])
    kill_at_some_point(out, overrides, random.Random(), targets)
    if not (out / "results.json").exists():  # killed before the end, as intended almost always
        assert main(["run", "--out", str(out), "--resume", *sets(overrides)]) == 0
    resumed = json.loads((out / "results.json").read_text())
    assert {k: resumed[k] for k in ACCURACY_KEYS} == {k: alone[k] for k in ACCURACY_KEYS}
    # metrics.csv holds each completed epoch exactly once
    epochs = [line.split(",")[:2] for line in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert len(epochs) == len(set(map(tuple, epochs)))


def test_truncated_checkpoint_is_a_clear_error(tmp_path, tiny_overrides, capsys):
    out = tmp_path / "run"
    overrides = tiny_overrides + ["method=dscl", "linear.epochs=1"]
    assert main(["run", "--out", str(out), *sets(overrides), "--set", "pretrain.epochs=1"]) == 0
    ckpt = out / "checkpoints" / "pretrain.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    (out / "results.json").unlink()
    assert main(["run", "--out", str(out), "--resume", *sets(overrides), "--set", "pretrain.epochs=1"]) == 2
    assert "pretrain.pt" in capsys.readouterr().err
    assert not (out / "results.json").exists()
