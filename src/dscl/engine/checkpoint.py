"""Atomic checkpoints and output files, and the check that a resume continues the same run."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from ..errors import CheckpointError
from ..methods import REGISTRY

# Keys of the config that define what a run IS; a resume that changes any of them is refused.
IDENTITY_KEYS = ("method", "seed", "data.name", "data.root", "data.imbalance_ratio", "model.backbone",
                 "model.feature_dim", "pretrain.queue_size", "pretrain.batch_size", "pretrain.num_patches",
                 "linear.batch_size")


def atomic_write_bytes(path: Path, write) -> None:
    """Write through a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            keep = f"the previous {path.name} is unchanged" if path.exists() else f"no {path.name} was written"
            raise CheckpointError(f"{path}: the disk is full (or over quota), {shutil.disk_usage(path.parent).free} "
                                  f"bytes free; {keep}. Free space, then continue with --resume") from exc
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda fh: fh.write(text.encode()))


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def write_yaml(path: Path, data: Any) -> None:
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


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


def config_differences(saved: dict, current: dict, stage: str | None = None) -> list[str]:
    """Lines ``key: saved -> current`` for every identity key that differs. For a stage-1
    checkpoint (``stage="pretrain"``) two methods that train the same stage 1 (ce and crt) match."""
    def value(config: dict, key: str):
        found = _lookup(config, key)
        if key == "method" and stage == "pretrain" and found in REGISTRY:
            return REGISTRY[found].stage1
        return found

    return [f"{key}: {_lookup(saved, key)!r} -> {_lookup(current, key)!r}" for key in IDENTITY_KEYS
            if value(saved, key) != value(current, key)]
