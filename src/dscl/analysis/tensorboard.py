"""TensorBoard scalars of a run, behind ``logging.tensorboard: true`` and the optional extra
``pip install 'dscl[tensorboard]'``.

Every numeric column of a metrics.csv row goes in per epoch (``pretrain/loss``,
``linear/val_top1``, ...) and the stage-1 losses and lr per step (``pretrain_step/...``), into
``<run>/tensorboard/``. With the key off (the default) nothing is imported or written; with it
on and the package missing, the run stops at its first step with a message saying what to install.
"""

from __future__ import annotations

import weakref

from ..errors import ConfigError

_writers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # RunDir -> SummaryWriter


def enabled(run_dir) -> bool:
    """Whether this process writes TensorBoard scalars for the run (rank 0, key on)."""
    return run_dir.is_main and bool((run_dir.config.get("logging") or {}).get("tensorboard"))


def writer(run_dir):
    """The run's SummaryWriter, opened on first use."""
    if run_dir not in _writers:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("logging.tensorboard: true needs the tensorboard package, which is not installed: "
                              "pip install 'dscl[tensorboard]' (or set logging.tensorboard: false)") from None
        _writers[run_dir] = SummaryWriter(log_dir=str(run_dir.path / "tensorboard"))
    return _writers[run_dir]


def epoch_scalars(run_dir, row: dict) -> None:
    """One metrics.csv row: each number as ``<stage>/<column>`` at step ``epoch``."""
    if not enabled(run_dir):
        return
    board, stage, epoch = writer(run_dir), row.get("stage", "run"), int(row.get("epoch", 0))
    for key, value in row.items():
        if key not in ("stage", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool):
            board.add_scalar(f"{stage}/{key}", value, epoch)
    board.flush()


def step_scalars(run_dir, step: int, values: dict) -> None:
    """Scalars of one stage-1 step (tensors or numbers) as ``pretrain_step/<name>``."""
    if not enabled(run_dir):
        return
    board = writer(run_dir)
    for key, value in values.items():
        if not key.startswith("_"):
            board.add_scalar(f"pretrain_step/{key}", float(value.detach() if hasattr(value, "detach") else value), step)
