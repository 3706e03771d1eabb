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
