import torch

import dscl.engine.pretrain as pretrain_module
from dscl.cli import main
from dscl.engine.checkpoint import load_checkpoint


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, tiny_overrides, monkeypatch, capsys):
    calls = {"n": 0}
    real = pretrain_module.stage1_losses

    def fails_on_fifth_step(*args, **kwargs):
        calls["n"] += 1
        loss, parts, keys = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] == 5 else loss), parts, keys

    monkeypatch.setattr(pretrain_module, "stage1_losses", fails_on_fifth_step)
    out = tmp_path / "run"
    sets = [x for o in tiny_overrides + ["method=dscl", "checkpoint_every_steps=1"] for x in ("--set", o)]
    assert main(["run", "--out", str(out), *sets]) == 2
    err = capsys.readouterr().err
    assert "epoch 2, step 2" in err and "nan" in err  # 3 steps per epoch: the fifth is epoch 2, step 2
    state = load_checkpoint(out / "checkpoints" / "pretrain_last.pt")
    assert (state["epoch"], state["step"]) == (1, 1)  # the state after step 4, the last good one
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (out / "results.json").exists() and not (out / "checkpoints" / "pretrain.pt").exists()


def test_finite_check_reads_the_sum_every_few_steps_on_a_gpu_and_names_the_span():
    """On a GPU the stage-1 losses are summed on the device and read every CHECK_EVERY steps (and
    at the epoch's end, and before a checkpoint); a NaN in the middle is caught at the next read,
    which names the steps it covers.

    Guards against: a NaN lost from the sum (the sum reset before it is read); the span naming the
    wrong steps; a GPU reading every step (the host waiting on the device) or never reading."""
    import pytest

    from dscl.engine.step import FiniteCheck
    from dscl.errors import NumericalError

    check = FiniteCheck(torch.device("cuda"), first_step=0, hint="hint")  # a device name only: nothing runs there
    every, steps = FiniteCheck.CHECK_EVERY, 3 * FiniteCheck.CHECK_EVERY + 5
    read = [step for step in range(every + 3) if check.add(torch.tensor(1.0), "stage 1, epoch 1", step, steps)]
    assert read == [every - 1]
    assert check.add(torch.tensor(float("nan")), "e", every + 3, steps) is False  # summed, not read yet
    with pytest.raises(NumericalError, match=rf"e, steps {every + 1} to {2 * every}: the loss is not finite.*hint"):
        for step in range(every + 4, 2 * every):
            check.add(torch.tensor(1.0), "e", step, steps)
    last = FiniteCheck(torch.device("cuda"), first_step=steps - 2, hint="")
    assert [last.add(torch.tensor(1.0), "e", s, steps) for s in (steps - 2, steps - 1)] == [False, True]
    assert FiniteCheck(torch.device("cuda"), 0, "").add(torch.tensor(1.0), "e", 0, steps, now=True)
    cpu = FiniteCheck(torch.device("cpu"), 0, "")
    assert all(cpu.add(torch.tensor(1.0), "e", step, steps) for step in range(3))
