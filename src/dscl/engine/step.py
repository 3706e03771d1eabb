"""What every training step of both stages shares: autocast, moving batches to the device,
channels-last and compiled encoders, the finite-loss check across processes, unwrapping DDP."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config import Config
from ..errors import NumericalError
from .distributed import all_reduce_sum


def stop_if_not_finite(loss: torch.Tensor, where: str, hint: str) -> None:
    """Raise the same NumericalError on every rank when the loss of any rank is NaN or infinite
    (one all-reduce of a flag), so no rank is left waiting at the next collective."""
    bad = all_reduce_sum((~torch.isfinite(loss.detach())).float().reshape(1))
    if bad.item():
        raise NumericalError(f"{where}: the loss is not finite in {int(bad.item())} process(es) "
                             f"(here: {loss.item()}); {hint}")


def autocast(cfg: Config, device: torch.device):
    """bf16 autocast for the networks when ``precision: bf16``; a no-op context otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


def to_device(images: torch.Tensor, device: torch.device, cfg: Config) -> torch.Tensor:
    """Move a (..., 3, H, W) image batch, in channels-last layout when asked."""
    images = images.to(device, non_blocking=True)
    if cfg.channels_last and images.ndim == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def prepare_model(model: nn.Module, cfg: Config) -> nn.Module:
    """Channels-last weights and ``torch.compile`` of the encoders, in place (state-dict keys unchanged)."""
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.compile:
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
