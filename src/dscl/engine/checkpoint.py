"""Atomic checkpoints, and the check that a resume continues the same run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..files import atomic_write_bytes
from ..methods import REGISTRY

# Keys of the config that define what a run IS; a resume that changes any of them is refused.
IDENTITY_KEYS = ("method", "seed", "data.name", "data.imbalance_ratio", "model.backbone",
                 "model.feature_dim", "pretrain.queue_size", "pretrain.batch_size", "pretrain.num_patches",
                 "linear.batch_size")


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write_bytes(path, lambda fh: torch.save(state, fh))


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # truncated / not a torch file
        raise CheckpointError(f"{path}: unreadable checkpoint (truncated or not written by dscl): {exc}") from exc
    if not isinstance(state, dict) or "format" not in state:
        raise CheckpointError(f"{path}: not a dscl checkpoint")
    return state


def _lookup(values: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        values = values.get(part) if isinstance(values, dict) else None
    return values


def config_differences(saved: dict, current: dict, stage: str | None = None, data_moved: bool = True) -> list[str]:
    """Lines ``key: saved -> current`` for every identity key (and ``data.root`` unless ``data_moved``) that
    differs. For a stage-1 checkpoint (``stage="pretrain"``) ce and crt, which train the same stage 1, match."""
    keys = IDENTITY_KEYS if data_moved else (*IDENTITY_KEYS, "data.root")
    def value(config: dict, key: str):
        found = _lookup(config, key)
        if key == "method" and stage == "pretrain" and found in REGISTRY:
            return REGISTRY[found].stage1
        return found

    return [f"{key}: {_lookup(saved, key)!r} -> {_lookup(current, key)!r}" for key in keys
            if value(saved, key) != value(current, key)]
