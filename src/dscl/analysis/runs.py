"""A run folder as the analyses read it: its config, its data, its stage-1 networks, its images.

The run folder, its config and its classifier come from :mod:`dscl.engine.trained` (which also
knows the names of the published weights); this module adds what only the analyses need.
Every failure a user can cause (a folder that holds no run, a missing checkpoint, one written
by another run, an image that cannot be read, a box outside the image) raises a
:class:`~dscl.errors.DSCLError` subclass naming the path or the argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..config import Config
from ..data import DataSplits, eval_transform, load_rgb
from ..engine.distributed import resolve_device
from ..engine.rundir import RunDir
from ..engine.trained import load_weights, read_run, stage1_state
from ..weights import run_folder
from ..engine.views import normalisation
from ..errors import ArgumentError, ConfigError
from ..models import MomentumContrast, MultiExpertContrast


def run_path(path: str | Path, hint: str = "give the --out folder of `dscl run`") -> Path:
    """The run folder ``path``, or the published weights of that name (:func:`dscl.weights.run_folder`);
    a folder that holds no run is refused with what it holds instead and ``hint``."""
    path = Path(path)
    if path.is_dir() and not (path / "config.yaml").is_file():
        what = "the folder is empty" if not any(path.iterdir()) else "no config.yaml"
        raise ConfigError(f"{path} holds no dscl run ({what}); {hint}")
    return run_folder(path)


def open_run(path: str | Path, data_root: str | Path | None = None) -> tuple[RunDir, Config]:
    """The run (see :func:`run_path`) and the config it was trained with; ``data_root`` replaces
    ``data.root`` of the config returned (for a run folder copied from the machine that trained
    it), while the checkpoints are still checked against the config they were trained with."""
    run, cfg = read_run(run_path(path))
    if data_root is not None:
        cfg.data.root = str(data_root)
    return run, cfg


def device_of(name: str = "auto") -> torch.device:
    """``auto``: the first GPU when there is one, else the CPU."""
    try:
        return resolve_device(name)
    except RuntimeError as exc:
        raise ConfigError(f"--device {name}: {exc}") from None


def single_expert(run: RunDir, cfg: Config, why: str) -> None:
    """Refuse a run with ``model.experts > 1`` for an analysis that needs one network; ``why`` says what it needs."""
    if cfg.model.experts > 1:
        raise ConfigError(f"{run.path}: a run with model.experts {cfg.model.experts}; {why}, so this analysis reads "
                          f"runs with model.experts 1 only")


def stage1_model(run: RunDir, cfg: Config, num_classes: int, checkpoint: str | Path | None = None, *,
                 initial: bool = False) -> MomentumContrast | MultiExpertContrast:
    """The stage-1 model (encoders, heads, queues) of a contrastive run, in eval mode on the CPU:
    its finished stage 1, or ``checkpoint`` (a stage-1 checkpoint of the run); ``initial``: the
    weights the run started from (seeded as training seeds them)."""
    from ..engine.pretrain import build_stage1_model
    from ..seeding import mix_seed, seed_everything

    if not initial and not cfg.method_spec.contrastive:
        raise ConfigError(f"{run.path} is a {cfg.method} run: it has no contrastive stage 1 (no projection head, "
                          f"no queue); use a scl / dscl run, or the initial weights")
    seed_everything(mix_seed(cfg.seed, 0))
    model = build_stage1_model(cfg if cfg.method_spec.contrastive else as_contrastive(cfg), num_classes)
    if not initial:
        load_weights(model, stage1_state(run, checkpoint), Path(checkpoint or run.checkpoint("pretrain")))
    return model.eval()


def as_contrastive(cfg: Config) -> Config:
    """The run's config as a plain two-view SCL run: same networks, queue and data, no patches."""
    from ..config import config_from_dict

    values = cfg.to_dict()
    values["method"] = "scl"
    for key in ("pbsd_teacher", "patch_mode"):  # patch-term variants, which plain SCL refuses
        values.get("pretrain", {}).pop(key, None)
    return config_from_dict(values)


def load_data(cfg: Config) -> DataSplits:
    from ..engine.runner import load_data as runner_load_data

    return runner_load_data(cfg)


@dataclass
class ViewedImage:
    """An image as the network sees it (normalised, (3, S, S)) and as a person sees it (uint8)."""

    input: Tensor  # (3, S, S)
    pixels: np.ndarray  # (S, S, 3) uint8
    label: int | None = None
    name: str = ""


def view_image(image, size: int, label: int | None = None, name: str = "") -> ViewedImage:
    """The deterministic test-time view of a PIL image at the run's size."""
    mean, std = normalisation(size)
    x = eval_transform(size, mean, std)(image)
    pixels = (x * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)).clamp(0, 1)
    return ViewedImage(x, (pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), label, name)


def image_from_file(file: str | Path, size: int) -> ViewedImage:
    return view_image(load_rgb(str(file)), size, name=Path(file).name)  # DataError when unreadable


def image_from_split(splits: DataSplits, split: str, index: int) -> ViewedImage:
    dataset = {"train": splits.train, "val": splits.val, "test": splits.test}.get(split)
    if dataset is None:
        raise ArgumentError(f"--split {split}: this run's data has no {split} split")
    if not 0 <= index < len(dataset):
        raise ArgumentError(f"--index {index}: the {split} split has {len(dataset)} images (0 to {len(dataset) - 1})")
    image, label = dataset[index]
    return view_image(image, splits.image_size, int(label), f"{split}[{index}] ({splits.classes[int(label)]})")


def check_box(box, size: int) -> tuple[float, float, float, float]:
    """A box ``x1, y1, x2, y2`` in pixels of the S x S network input, checked to lie inside it."""
    if len(box) != 4:
        raise ArgumentError(f"--box {','.join(map(str, box))}: expected four numbers x1,y1,x2,y2")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not (0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size):
        raise ArgumentError(f"--box {x1:g},{y1:g},{x2:g},{y2:g} does not lie inside the {size}x{size} image the "
                            f"network sees (need 0 <= x1 < x2 <= {size} and 0 <= y1 < y2 <= {size})")
    return x1, y1, x2, y2


def parse_box(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise ArgumentError(f"--box {text}: expected four numbers x1,y1,x2,y2") from None
