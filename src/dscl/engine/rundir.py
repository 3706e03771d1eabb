"""The output folder of a run: config.yaml, metrics.csv, log.txt, checkpoints/, results.json,
and with ``logging.tensorboard: true`` (the optional extra ``pip install 'dscl[tensorboard]'``)
TensorBoard scalars in tensorboard/: each numeric metrics.csv column per epoch
(``pretrain/loss``, ``linear/val_top1``, ...) and stage 1's losses and lr per step
(``pretrain_step/...``). With the key off nothing of TensorBoard is imported.

Only rank 0 writes. Every file is written whole and atomically, so a crash never leaves a
half-written file that looks complete; metrics.csv is rewritten from the rows a checkpoint
carries, so after a resume it holds exactly the epochs that were really completed.
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from ..errors import CheckpointError, ConfigError
from ..files import write_csv, write_json, write_yaml
from .checkpoint import config_differences, load_checkpoint, save_checkpoint

FORMAT = 1


class RunDir:
    def __init__(self, path: str | Path, is_main: bool = True):
        self.path = Path(path)
        self.is_main = is_main
        self.metrics: list[dict] = []
        self.config: dict = {}
        self.data: dict | None = None  # the data's DataSplits.signature, once loaded
        self._board = None  # the SummaryWriter, opened on first use

    def checkpoint(self, name: str) -> Path:
        return self.path / "checkpoints" / f"{name}.pt"

    def prepare(self, config: dict, resume: bool) -> None:
        """Refuse to write over another run; on resume, refuse a run that differs in what it is.
        A folder whose run stopped before its first checkpoint (a wrong data root, say) holds
        nothing to protect: a new run, or a resume with other settings, takes it over.

        Every rank checks before any rank writes (callers put a barrier between ``check``
        and ``write_config`` when running distributed); ``prepare`` does both for one process.
        """
        self.check(config, resume)
        self.write_config()

    def check(self, config: dict, resume: bool) -> None:
        saved_path = self.path / "config.yaml"
        self.config = config
        if saved_path.is_file() and not self.has_progress():
            return  # a start that failed before its first checkpoint: the corrected rerun takes its place
        if saved_path.is_file():
            if not resume:
                raise ConfigError(f"{self.path} already holds a run (config.yaml); pass --resume to continue it "
                                  f"or choose another --out")
            try:
                saved = yaml.safe_load(saved_path.read_text()) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"{saved_path}: unreadable: {exc}") from exc
            if diffs := config_differences(saved, config):
                raise ConfigError(f"cannot resume {self.path}: the run there differs in\n  " + "\n  ".join(diffs))
        elif resume and self.path.exists() and any(self.path.iterdir()):
            raise ConfigError(f"{self.path} holds no dscl run to resume (no config.yaml)")

    def has_progress(self) -> bool:
        """Whether anything trained here: a checkpoint or a results file."""
        return (self.path / "results.json").is_file() or any((self.path / "checkpoints").glob("*.pt"))

    def write_config(self) -> None:
        if self.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            write_yaml(self.path / "config.yaml", self.config)

    def save(self, path: Path, state: dict) -> None:
        if self.is_main:
            save_checkpoint(path, {"format": FORMAT, "config": self.config, **state,
                                   **({} if self.data is None else {"data": self.data})})

    def load(self, path: Path) -> dict:
        """The checkpoint at ``path``, unless of another run. Its data may move (``data.root``), not change
        (classes, training images per class), except in one from before dscl recorded them."""
        state = load_checkpoint(path)
        data = state.get("data")
        diffs = config_differences(state.get("config", {}), self.config, state.get("stage"), data is not None)
        if data is not None and self.data is not None and data != self.data:
            diffs.append("data: " + " -> ".join(f"{len(d['train_counts'])} classes, {sum(d['train_counts'])} "
                                                f"training images" for d in (data, self.data)))
        if diffs:
            raise CheckpointError(f"{path} belongs to a different run:\n  " + "\n  ".join(diffs))
        return state

    def add_metrics(self, row: dict) -> None:
        self.metrics.append(row)
        if not self.is_main:
            return
        self.write_metrics()
        self.log(" ".join(f"{k}={v}" for k, v in row.items()))
        board = self.tensorboard()
        if board is not None:
            stage, epoch = row.get("stage", "run"), int(row.get("epoch", 0))
            for key, value in row.items():
                if key not in ("stage", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    board.add_scalar(f"{stage}/{key}", value, epoch)
            board.flush()

    def add_step_scalars(self, step: int, values: dict) -> None:
        """Scalars of one stage-1 step (tensors or numbers) as ``pretrain_step/<name>``, when
        TensorBoard is on."""
        board = self.tensorboard()
        if board is not None:
            for key, value in values.items():
                board.add_scalar(f"pretrain_step/{key}", float(value.detach() if hasattr(value, "detach") else value),
                                 step)

    def tensorboard(self):
        """The run's SummaryWriter on rank 0 with ``logging.tensorboard: true``, else None."""
        if not (self.is_main and (self.config.get("logging") or {}).get("tensorboard")):
            return None
        if self._board is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("logging.tensorboard: true needs the tensorboard package, which is not installed: "
                                  "pip install 'dscl[tensorboard]' (or set logging.tensorboard: false)") from None
            self._board = SummaryWriter(log_dir=str(self.path / "tensorboard"))
        return self._board

    def write_metrics(self) -> None:
        """metrics.csv from the rows held (e.g. a reused stage 1's, which no epoch here adds)."""
        if self.is_main:
            write_csv(self.path / "metrics.csv", self.metrics)

    def log(self, message: str) -> None:
        if not self.is_main:
            return
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        with open(self.path / "log.txt", "a") as fh:
            fh.write(line + "\n")

    def write_results(self, results: dict) -> None:
        if self.is_main:
            write_json(self.path / "results.json", results)
