"""What every training step and epoch of both stages shares: autocast, moving batches to the device,
channels-last and compiled encoders, the finite-loss check across processes (every step, or every
few on a GPU), unwrapping DDP, the learning-rate write, the resumable ``<stage>_last.pt``
checkpoint and the epoch's metrics row."""

from __future__ import annotations

import shutil
import time

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config import Config
from ..errors import ConfigError, NumericalError
from .distributed import all_reduce_sum
from .rundir import RunDir


def stop_if_not_finite(loss: torch.Tensor, where: str, hint: str) -> None:
    """Raise the same NumericalError on every rank when the loss of any rank is NaN or infinite
    (one all-reduce of a flag), so no rank is left waiting at the next collective."""
    bad = all_reduce_sum((~torch.isfinite(loss.detach())).float().reshape(1))
    if bad.item():
        raise NumericalError(f"{where}: the loss is not finite in {int(bad.item())} process(es) "
                             f"(here: {loss.item()}); {hint}")


class FiniteCheck:
    """Stage 1's losses summed on the device (finite iff each is), read every step; on a GPU every
    ``CHECK_EVERY`` steps, at the epoch's end and before a checkpoint only (a read makes the host wait)."""

    CHECK_EVERY = 25

    def __init__(self, device: torch.device, first_step: int, hint: str):
        self.every = 1 if device.type != "cuda" else self.CHECK_EVERY
        self.unchecked, self.first, self.hint = None, first_step, hint

    def add(self, loss: torch.Tensor, where: str, step: int, steps: int, now: bool = False) -> bool:
        """Add step ``step``'s loss (0-based, of ``steps``); True when the sum was read (and finite)."""
        self.unchecked = loss.detach() if self.unchecked is None else self.unchecked + loss.detach()
        if not (now or (step + 1) % self.every == 0 or step + 1 == steps):
            return False
        span = f"step {step + 1}" if self.first == step else f"steps {self.first + 1} to {step + 1}"
        stop_if_not_finite(self.unchecked, f"{where}, {span}", self.hint)
        self.unchecked, self.first = None, step + 1
        return True


def autocast(cfg: Config, device: torch.device):
    """bf16 autocast for the networks when ``precision: bf16``; a no-op context otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


def to_device(images: torch.Tensor, device: torch.device, cfg: Config) -> torch.Tensor:
    """Move a (..., 3, H, W) image batch, in channels-last layout when asked."""
    images = images.to(device, non_blocking=True)
    if cfg.channels_last and images.ndim == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def check_can_compile(cfg: Config, device: torch.device, world_size: int = 1) -> None:
    """Refuse ``compile: true`` / ``step`` at the start of a run, naming the key, where this PyTorch
    cannot compile on ``device``: no ``torch.compile``, or (inductor's default backend on a CPU) no
    C++ compiler among those inductor tries (``torch._inductor.config.cpp.cxx``: ``$CXX``, else g++);
    and ``compile: step`` in more than one process (DDP's gradient hooks and the gathering of keys
    stay outside a compiled step)."""
    if cfg.compile is False:
        return
    if cfg.compile == "step" and world_size > 1:
        raise ConfigError(f"compile: step runs in one process only, not in {world_size} (DDP's gradient hooks "
                          f"and the gathering of keys stay outside a compiled step); use compile: true or false")
    if not callable(getattr(torch, "compile", None)):
        raise ConfigError(f"compile: {cfg.compile!r} needs torch.compile, which PyTorch {torch.__version__} lacks; "
                          f"set compile: false, or install PyTorch >= 2.0")
    if device.type == "cpu":
        try:
            from torch._inductor import config as inductor
            names = inductor.cpp.cxx if isinstance(inductor.cpp.cxx, (list, tuple)) else (inductor.cpp.cxx,)
        except ImportError:
            names = ("g++",)
        if not any(name and shutil.which(name) for name in names):
            raise ConfigError(f"compile: {cfg.compile!r} on a CPU needs a C++ compiler for torch.compile (tried "
                              f"{', '.join(n for n in names if n)}; none found); install one (e.g. g++, or point "
                              f"$CXX at it), or set compile: false")


def prepare_model(model: nn.Module, cfg: Config) -> nn.Module:
    """Channels-last weights and ``torch.compile`` of the encoders, in place (state-dict keys unchanged).

    Only ``compile: true`` compiles the encoders here; ``compile: step`` compiles the whole stage-1
    step instead (:func:`dscl.engine.pretrain.compiled_step`), and leaves stage 2 eager."""
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.compile is True:
        # The method every call goes through is what gets compiled: forward_features (the query
        # view calls it directly, the crops and keys through forward), or expert_maps for a
        # multi-expert backbone. Compiling the module alone left the query view eager beside
        # compiled crops, and a BatchNorm run eagerly and compiled in one step fails autograd's
        # in-place check on its running statistics.
        for name in ("encoder", "key_encoder", "backbone"):
            if hasattr(model, name):
                module = getattr(model, name)
                entry = "expert_maps" if hasattr(module, "expert_maps") else "forward_features"
                setattr(module, entry, torch.compile(getattr(module, entry)))
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper, or the model itself."""
    return model.module if isinstance(model, DistributedDataParallel) else model



def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class LastCheckpoint:
    """``checkpoints/<stage>_last.pt``, saved every ``checkpoint_every_steps`` steps and after each epoch:
    the ``modules`` (by state-dict key), the optimiser, epoch, step, the metrics so far and any ``extra``."""

    def __init__(self, run: RunDir, cfg: Config, stage: str, label: str, optimizer, **modules: nn.Module):
        self.run, self.every, self.stage, self.label = run, cfg.checkpoint_every_steps, stage, label
        self.optimizer, self.modules, self.path = optimizer, modules, run.checkpoint(f"{stage}_last")

    def due(self, step: int, steps: int) -> bool:
        return bool(self.every) and (step + 1) % self.every == 0 and step + 1 < steps

    def resume(self) -> dict | None:
        """Restore modules, optimiser and metrics and log it (``label: resumed from``); the state, or None."""
        if not self.path.is_file():
            return None
        state = self.run.load(self.path)
        for name, module in self.modules.items():
            module.load_state_dict(state[name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.run.metrics = state["metrics"]
        self.run.log(f"{self.label}: resumed from {self.path} (epoch {state['epoch']}, step {state['step']})")
        return state

    def save(self, epoch: int, step: int, **extra) -> None:
        modules = {name: module.state_dict() for name, module in self.modules.items()}
        self.run.save(self.path, {"stage": self.stage, **modules, "optimizer": self.optimizer.state_dict(),
                                  "epoch": epoch, "step": step, "metrics": self.run.metrics, **extra})


class EpochMeter:
    """An epoch's clock and the sums of its steps' parts; :meth:`row` makes its metrics row."""

    def __init__(self):
        self.sums, self.seen, self.tic = {}, 0, time.perf_counter()

    def add(self, parts: dict) -> None:
        self.sums.update({k: self.sums.get(k, 0.0) + (v.detach() if torch.is_tensor(v) else v)
                          for k, v in parts.items()})
        self.seen += 1

    def row(self, stage: str, epoch: int, lr: float, local_batch: int) -> dict:
        """``stage, epoch, lr, seconds, images_per_s`` (all processes'), then each part's mean over the steps."""
        elapsed = time.perf_counter() - self.tic
        images = float(all_reduce_sum(torch.tensor(float(self.seen * local_batch))))
        return {"stage": stage, "epoch": epoch, "lr": lr, "seconds": round(elapsed, 3),
                "images_per_s": round(images / max(elapsed, 1e-9), 2),
                **{k: round(float(v) / max(self.seen, 1), 5) for k, v in self.sums.items()}}
