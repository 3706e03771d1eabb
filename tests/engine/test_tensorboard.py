"""TensorBoard scalars behind ``logging.tensorboard`` and the optional ``tensorboard`` extra."""

import importlib.util
import sys
import types

import pytest

from dscl.cli import main
from dscl.config import load_config
from dscl.engine.rundir import RunDir
from dscl.errors import ConfigError

from conftest import TINY


class FakeWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter: records every scalar."""

    made = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.flushed = log_dir, [], 0
        FakeWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, float(value), step))

    def flush(self):
        self.flushed += 1


@pytest.fixture
def fake_tensorboard(monkeypatch):
    FakeWriter.made = []
    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    return FakeWriter


def test_config_key_defaults_off_and_is_type_checked():
    assert load_config().logging.tensorboard is False
    assert load_config(overrides=["logging.tensorboard=true"]).logging.tensorboard is True
    with pytest.raises(ConfigError, match="logging.tensorboard"):
        load_config(overrides=["logging.tensorboard=sometimes"])


def test_epoch_rows_become_scalars_only_when_asked(tmp_path, fake_tensorboard):
    off = RunDir(tmp_path / "off")
    off.prepare({"logging": {"tensorboard": False}}, resume=False)
    off.add_metrics({"stage": "pretrain", "epoch": 1, "loss": 2.0})
    assert fake_tensorboard.made == []
    on = RunDir(tmp_path / "on")
    on.prepare({"logging": {"tensorboard": True}}, resume=False)
    on.add_metrics({"stage": "pretrain", "epoch": 1, "lr": 0.1, "loss": 2.0})
    on.add_metrics({"stage": "linear", "epoch": 3, "loss": 1.5, "val_top1": 40.0})
    (writer,) = fake_tensorboard.made
    assert writer.log_dir == str(tmp_path / "on" / "tensorboard")
    assert writer.scalars == [("pretrain/lr", 0.1, 1), ("pretrain/loss", 2.0, 1), ("linear/loss", 1.5, 3),
                              ("linear/val_top1", 40.0, 3)]
    assert writer.flushed == 2


def test_stage_1_writes_each_step(tmp_path, fake_tensorboard):
    sets = [x for o in TINY + ["method=dscl", "logging.tensorboard=true"] for x in ("--set", o)]
    assert main(["pretrain", "--out", str(tmp_path / "run"), *sets]) == 0
    (writer,) = fake_tensorboard.made
    steps = sorted({step for tag, _, step in writer.scalars if tag == "pretrain_step/loss"})
    assert steps == list(range(6))  # 2 epochs x 3 steps
    tags = {tag for tag, _, _ in writer.scalars}
    assert {"pretrain_step/lr", "pretrain_step/contrast", "pretrain/loss", "pretrain/knn_top1"} <= tags


def test_missing_package_is_a_clear_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as when not installed
    sets = [x for o in TINY + ["method=scl", "logging.tensorboard=true"] for x in ("--set", o)]
    assert main(["pretrain", "--out", str(tmp_path / "run"), *sets]) == 2
    err = capsys.readouterr().err
    assert "pip install 'dscl[tensorboard]'" in err and "Traceback" not in err


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="the tensorboard extra is not installed")
def test_real_writer_leaves_an_event_file(tmp_path):
    run = RunDir(tmp_path)
    run.prepare({"logging": {"tensorboard": True}}, resume=False)
    run.add_metrics({"stage": "pretrain", "epoch": 1, "loss": 2.0})
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
