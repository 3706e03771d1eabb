"""A run killed with SIGKILL at a seeded point mid-run and resumed ends exactly as one left alone."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.utils.data

from dscl.cli import main
from dscl.data import loading
from dscl.engine.checkpoint import load_checkpoint

ACCURACY_KEYS = ("overall", "many", "medium", "few", "per_class")
# With these settings a run writes checkpoints/pretrain_last.pt 9 times (3 epochs x 3 steps)
# and checkpoints/linear_last.pt 6 times (3 epochs x 2 steps); the kill comes right after one
# of the first writes of either, so that a good part of the run is still to do.
RESUME = ["checkpoint_every_steps=1", "pretrain.epochs=3", "linear.epochs=3"]
KILL_POINTS = {"pretrain_last.pt": range(1, 7), "linear_last.pt": range(1, 4)}


def sets(overrides):
    return [x for o in overrides for x in ("--set", o)]


def _stamp(path: Path):
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def kill_mid_run(out: Path, overrides, target: str, writes: int) -> None:
    """Start the run in a subprocess and SIGKILL it as soon as checkpoints/``target`` has been
    written ``writes`` times (each save replaces the file, so each write is a new stamp).
    Fails unless the process was still running when killed and has not written results.json."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    with open(out.parent / f"{out.name}.stderr", "w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "dscl", "run", "--out", str(out), *sets(overrides)],
                                env=env, stdout=subprocess.DEVNULL, stderr=err)
        path, seen, last = out / "checkpoints" / target, 0, None
        deadline = time.time() + 180
        while seen < writes and proc.poll() is None and time.time() < deadline:
            stamp = _stamp(path)
            if stamp is not None and stamp != last:
                seen, last = seen + 1, stamp
                continue
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        err.seek(0)
        tail = err.read()[-2000:]
    assert proc.returncode == -signal.SIGKILL, (
        f"the run ended by itself (exit {proc.returncode}) before write {writes} of {target} "
        f"(saw {seen}):\n{tail}")
    assert seen == writes, f"timed out waiting for write {writes} of {target} (saw {seen})"
    assert not (out / "results.json").exists(), "the run had already finished when it was killed"
    stage_done = out / "checkpoints" / ("pretrain.pt" if target.startswith("pretrain") else "linear_best.pt")
    assert not stage_done.exists(), f"the run was killed after its stage had ended ({stage_done.name} exists)"


def assert_same_tensors(resumed: dict, alone: dict, what: str) -> None:
    assert resumed.keys() == alone.keys(), what
    for name in alone:
        assert torch.equal(resumed[name], alone[name]), f"{what}: {name} differs"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Output folder of one uninterrupted run per method, shared by the seeds of that method."""
    runs = {}

    def get(method: str, overrides) -> Path:
        if method not in runs:
            out = tmp_path_factory.mktemp("alone") / "run"
            assert main(["run", "--out", str(out), *sets(overrides)]) == 0
            runs[method] = out
        return runs[method]

    return get


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("method", ["dscl+pbsd", "ce"])
def test_killed_and_resumed_run_matches_uninterrupted(tmp_path, tiny_overrides, uninterrupted, method, seed):
    # Bugs caught: any state a resume fails to restore (optimiser momentum, queue, RNG streams,
    # data order, the stage-2 standardiser or best-epoch record) changes the final tensors.
    overrides = tiny_overrides + [f"method={method}", *RESUME]
    alone_dir = uninterrupted(method, overrides)
    rng = random.Random(seed)
    points = [(name, n) for name, writes in KILL_POINTS.items() for n in writes
              if method != "ce" or name == "pretrain_last.pt"]  # ce has no stage 2
    target, writes = rng.choice(points)

    out = tmp_path / "killed"
    kill_mid_run(out, overrides, target, writes)
    assert main(["run", "--out", str(out), "--resume", *sets(overrides)]) == 0

    resumed = json.loads((out / "results.json").read_text())
    alone = json.loads((alone_dir / "results.json").read_text())
    assert {k: resumed[k] for k in ACCURACY_KEYS} == {k: alone[k] for k in ACCURACY_KEYS}
    assert_same_tensors(load_checkpoint(out / "checkpoints" / "pretrain.pt")["model"],
                        load_checkpoint(alone_dir / "checkpoints" / "pretrain.pt")["model"], "pretrain.pt model")
    if method != "ce":
        best, best_alone = (load_checkpoint(d / "checkpoints" / "linear_best.pt") for d in (out, alone_dir))
        for part in ("fc", "norm"):
            assert_same_tensors(best[part], best_alone[part], f"linear_best.pt {part}")
    stage = "stage 1" if target == "pretrain_last.pt" else "stage 2"
    assert f"{stage}: resumed from" in (out / "log.txt").read_text()  # the log says where it went on from
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


def test_a_dead_loader_worker_stops_the_run_and_resume_continues_exactly(tmp_path, tiny_overrides, monkeypatch,
                                                                        capsys):
    # Bug caught: a worker killed by the OOM killer surfacing as a DataLoader traceback (or a
    # hang), or a resume after it that does not continue the same run.
    overrides = tiny_overrides + ["method=dscl", "data.pipeline=pil", "data.num_workers=1", "checkpoint_every_steps=1",
                                  "linear.epochs=1"]
    assert main(["run", "--out", str(tmp_path / "alone"), *sets(overrides)]) == 0
    alone = json.loads((tmp_path / "alone" / "results.json").read_text())

    flag = tmp_path / "killed-once"
    real = loading.SeededDataset.__getitem__

    def dies_once_in_a_worker(self, item):
        info = torch.utils.data.get_worker_info()
        if info is not None and item[0] % 7 == 3 and not flag.exists():
            flag.write_text("x")
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, item)

    monkeypatch.setattr(loading.SeededDataset, "__getitem__", dies_once_in_a_worker)
    out = tmp_path / "killed"
    assert main(["run", "--out", str(out), *sets(overrides)]) == 2
    err = capsys.readouterr().err
    assert flag.exists() and "data-loader worker process died" in err and "--resume" in err
    assert main(["run", "--out", str(out), "--resume", *sets(overrides)]) == 0
    resumed = json.loads((out / "results.json").read_text())
    assert {k: resumed[k] for k in ACCURACY_KEYS} == {k: alone[k] for k in ACCURACY_KEYS}
