"""Two CPU processes on gloo: the queue after a step, keys through the cross-rank shuffle, and a short
torchrun run that resumes."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from dscl.config import load_config
from dscl.engine.distributed import all_gather_cat
from dscl.engine.pretrain import build_stage1_model, stage1_losses

SRC = str(Path(__file__).parents[2] / "src")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_step(rank: int, out: str) -> None:
    torch.manual_seed(0)  # same initial weights on both ranks, as DDP would broadcast
    cfg = load_config(None, ["pretrain.batch_size=8", "pretrain.queue_size=16", "pretrain.num_patches=2",
                             "pretrain.key_bn_groups=2", "method=dscl+pbsd"])
    model = build_stage1_model(cfg, 5)
    torch.manual_seed(100 + rank)  # each rank its own batch
    b = 4
    boxes = torch.tensor([0.0, 0.0, 16.0, 16.0]).repeat(b, 2, 1)
    batch = ((torch.randn(b, 3, 32, 32), torch.randn(b, 3, 32, 32), torch.randn(b, 2, 3, 16, 16), boxes),
             torch.randint(0, 5, (b,)))
    loss, parts, keys = stage1_losses(model, batch, cfg, torch.device("cpu"))
    loss.backward()
    model.queue.enqueue(all_gather_cat(keys), all_gather_cat(batch[1]))
    torch.save({"keys": keys, "labels": batch[1], "queue": model.queue.keys.clone(),
                "queue_labels": model.queue.labels.clone(), "ptr": int(model.queue.ptr)}, f"{out}/rank{rank}.pt")


def _shuffled_keys(rank: int, out: str) -> None:
    """Keys through the cross-rank shuffle against keys computed on the rank's own batch, with
    the key encoder in eval mode so that a sample's key does not depend on its batch-mates."""
    torch.manual_seed(0)
    cfg = load_config(None, ["pretrain.batch_size=8", "pretrain.queue_size=16", "pretrain.key_bn_groups=2",
                             "method=dscl"])
    model = build_stage1_model(cfg, 5)
    model.key_encoder.eval()
    model.key_head.eval()
    torch.manual_seed(200 + rank)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        direct = F.normalize(model.key_head(model.key_encoder(x)), dim=1)
    processed = []
    model.key_encoder.register_forward_pre_hook(lambda module, args: processed.append(args[0].clone()))
    torch.manual_seed(300 + rank)  # each rank would draw another permutation: only rank 0's may count
    keys = model.encode_keys(x)
    torch.save({"x": x, "direct": direct, "keys": keys, "processed": processed[0]}, f"{out}/shuffle{rank}.pt")


def _two_ranks(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    _one_step(rank, out)
    _shuffled_keys(rank, out)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One pair of spawned gloo processes for the in-process checks below (spawning costs seconds)."""
    out = tmp_path_factory.mktemp("two_ranks")
    mp.start_processes(_two_ranks, args=(2, free_port(), str(out)), nprocs=2, start_method="spawn")
    return out


def test_every_rank_holds_the_same_queue_with_keys_of_both(two_ranks):
    r0, r1 = (torch.load(two_ranks / f"rank{r}.pt") for r in range(2))
    assert torch.equal(r0["queue"], r1["queue"]) and torch.equal(r0["queue_labels"], r1["queue_labels"])
    assert r0["ptr"] == r1["ptr"] == 8
    torch.testing.assert_close(r0["queue"][:4], r0["keys"])  # rank 0's keys, then rank 1's
    torch.testing.assert_close(r0["queue"][4:8], r1["keys"])
    assert torch.equal(r0["queue_labels"][:8], torch.cat([r0["labels"], r1["labels"]]))
    assert bool((r0["queue_labels"][8:] == -1).all())


def test_keys_come_back_to_their_own_rank_and_row_after_the_cross_rank_shuffle(two_ranks):
    # Bugs caught: the inverse permutation not applied (or the forward one applied again), the
    # permutation not broadcast from rank 0 (rows lost or duplicated), the wrong rank's slice kept.
    ranks = [torch.load(two_ranks / f"shuffle{r}.pt") for r in range(2)]
    for r in ranks:
        torch.testing.assert_close(r["keys"], r["direct"], rtol=0, atol=1e-6)
    # what the ranks' key encoders processed is the 8 images of both ranks, each exactly once
    full = torch.cat([r["x"] for r in ranks]).flatten(1)
    source = [[int((full == row).all(1).nonzero().squeeze()) for row in r["processed"].flatten(1)] for r in ranks]
    assert sorted(source[0] + source[1]) == list(range(8))
    # and the shuffle really crossed ranks: each rank processed images of the other rank
    assert any(s >= 4 for s in source[0]) and any(s < 4 for s in source[1])
    for r in ranks:
        assert not torch.equal(r["processed"], r["x"])


def torchrun(out: Path, overrides, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "dscl", "run", "--out", str(out), *extra, *[x for o in overrides for x in ("--set", o)]]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_two_process_run_trains_and_resumes(tmp_path, tiny_overrides):
    out = tmp_path / "run"
    first = torchrun(out, tiny_overrides + ["pretrain.epochs=1", "linear.epochs=1"])
    assert first.returncode == 0, first.stderr[-2000:]
    assert "effective batch 8 = 2 x 4" in (out / "log.txt").read_text()
    again = torchrun(out, tiny_overrides + ["pretrain.epochs=2", "linear.epochs=1"], "--resume")
    assert again.returncode == 0, again.stderr[-2000:]
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    assert [r.split(",")[:2] for r in rows] == [["pretrain", "1"], ["pretrain", "2"], ["linear", "1"]]
    assert json.loads((out / "results.json").read_text())["method"] == "dscl+pbsd"


def _nan_on_rank_one(rank: int, world: int, port: int, out: str, overrides: list) -> None:
    import dscl.engine.pretrain as pretrain_module
    from dscl.engine import run, setup
    from dscl.errors import NumericalError

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    real, calls = pretrain_module.stage1_losses, {"n": 0}

    def nan_at_second_step_of_rank_one(*args, **kwargs):
        calls["n"] += 1
        loss, parts, keys = real(*args, **kwargs)
        return (loss * float("nan") if rank == 1 and calls["n"] == 2 else loss), parts, keys

    pretrain_module.stage1_losses = nan_at_second_step_of_rank_one
    rt = setup("cpu")
    try:
        run(load_config(None, overrides), Path(out) / "run", rt)
        message = "finished"
    except NumericalError as exc:
        message = str(exc)
    Path(out, f"rank{rank}.txt").write_text(message)
    dist.destroy_process_group()


def test_a_nan_on_one_rank_stops_every_rank_with_the_same_message(tmp_path, tiny_overrides):
    # Bug caught: the rank with the NaN raises alone and the other waits at the next collective
    # until the process group times out (30 minutes by default).
    ctx = mp.start_processes(_nan_on_rank_one, args=(2, free_port(), str(tmp_path), tiny_overrides + ["method=dscl"]),
                             nprocs=2, start_method="spawn", join=False)
    deadline = time.time() + 120
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            raise AssertionError("a rank did not stop within 2 minutes of the NaN")
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert messages[0].split("(here")[0] == messages[1].split("(here")[0]
    assert messages[0].startswith("stage 1, epoch 1, step 2: the loss is not finite in 1 process(es)")
    assert "(here: nan)" in messages[1] and "(here: nan)" not in messages[0]
