"""A run folder as the analyses read it: its config, its data, its networks, its images.

Every failure a user can cause (a folder that holds no run, a missing checkpoint, one written
by another run, an image that cannot be read, a box outside the image) raises a
:class:`~dscl.errors.DSCLError` subclass naming the path or the argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..config import Config, load_config
from ..data import DataSplits, eval_transform, load_rgb
from ..engine.checkpoint import config_differences, load_checkpoint
from ..engine.distributed import resolve_device
from ..engine.views import normalisation
from ..errors import ArgumentError, CheckpointError, ConfigError
from ..models import Classifier, MomentumContrast


def open_run(path: str | Path, data_root: str | Path | None = None) -> tuple[Path, Config]:
    """The folder and the config it was trained with; ``data_root`` replaces ``data.root``
    (for a run folder copied from the machine that trained it)."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path}: no such run folder")
    if not (path / "config.yaml").is_file():
        what = "the folder is empty" if not any(path.iterdir()) else "no config.yaml"
        raise ConfigError(f"{path} holds no dscl run ({what}); give the --out folder of `dscl run`")
    cfg = load_config(path / "config.yaml")
    if data_root is not None:
        cfg.data.root = str(data_root)
    return path, cfg


def device_of(name: str = "auto") -> torch.device:
    """``auto``: the first GPU when there is one, else the CPU."""
    try:
        return resolve_device(name)
    except RuntimeError as exc:
        raise ConfigError(f"--device {name}: {exc}") from None


def run_checkpoint(path: Path, cfg: Config, name: str, checkpoint: str | Path | None = None) -> dict:
    """A checkpoint of the run in ``path`` (``checkpoints/<name>.pt`` unless ``checkpoint`` is
    given), refused when it was written by a run of another configuration."""
    file = Path(checkpoint) if checkpoint is not None else path / "checkpoints" / f"{name}.pt"
    if not file.is_file():
        hint = {"pretrain": "stage 1 has not finished there", "linear_best": "stage 2 has not finished there"}
        raise CheckpointError(f"{file}: no such checkpoint" + (f" ({hint[name]})" if name in hint and
                                                               checkpoint is None else ""))
    state = load_checkpoint(file)
    diffs = config_differences(state.get("config", {}), cfg.to_dict())
    if diffs:
        raise CheckpointError(f"{file} belongs to a different run than {path}:\n  " + "\n  ".join(diffs))
    return state


def _load_state(model: nn.Module, state: dict, file: str) -> None:
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{file}: its weights do not fit this run's model: {str(exc)[:300]}") from None


def _one_backbone(path: Path, cfg: Config) -> None:
    experts = getattr(cfg.model, "experts", 1)
    if experts > 1:
        raise ConfigError(f"{path}: a run with model.experts {experts}; the analyses read single-backbone runs only")


def stage1_model(path: Path, cfg: Config, num_classes: int, checkpoint: str | Path | None = None, *,
                 initial: bool = False) -> MomentumContrast:
    """The stage-1 model (encoders, head, queue) of a contrastive run, in eval mode on the CPU;
    ``initial``: the weights the run started from (seeded as training seeds them)."""
    from ..engine.pretrain import build_stage1_model
    from ..engine.seeding import mix_seed, seed_everything

    _one_backbone(path, cfg)
    as_contrast = cfg if cfg.method_spec.contrastive else _as_contrastive(cfg)
    seed_everything(mix_seed(cfg.seed, 0))
    model = build_stage1_model(as_contrast, num_classes)
    if not initial:
        if not cfg.method_spec.contrastive:
            raise ConfigError(f"{path} is a {cfg.method} run: it has no contrastive stage 1 (no projection head, "
                              f"no queue); use a scl / dscl run, or the initial weights")
        state = run_checkpoint(path, cfg, "pretrain", checkpoint)
        if "model" not in state:
            raise CheckpointError(f"{checkpoint or path / 'checkpoints/pretrain.pt'}: holds no stage-1 model")
        _load_state(model, state["model"], str(checkpoint or path / "checkpoints/pretrain.pt"))
    return model.eval()


def _as_contrastive(cfg: Config) -> Config:
    """The run's config as a plain two-view SCL run: same networks, queue and data, no patches."""
    from ..config import config_from_dict

    values = cfg.to_dict()
    values["method"] = "scl"
    for key in ("pbsd_teacher", "patch_mode"):  # patch-term variants, which plain SCL refuses
        values.get("pretrain", {}).pop(key, None)
    return config_from_dict(values)


def classifier(path: Path, cfg: Config, num_classes: int) -> Classifier:
    """The classifier the run was evaluated with: the end-to-end network of a ce run, else the
    stage-1 query encoder with the kept stage-2 linear layer. Eval mode, CPU."""
    from ..engine.linear import backbone_from_stage1
    from ..engine.pretrain import build_stage1_model

    _one_backbone(path, cfg)
    stage1 = run_checkpoint(path, cfg, "pretrain")["model"]
    if not cfg.method_spec.stage2:
        model = build_stage1_model(cfg, num_classes)
        _load_state(model, stage1, str(path / "checkpoints/pretrain.pt"))
        return model.eval()
    best = run_checkpoint(path, cfg, "linear_best")
    if not best.get("complete") or "fc" not in best:
        raise CheckpointError(f"{path / 'checkpoints/linear_best.pt'}: stage 2 did not finish")
    model = Classifier(backbone_from_stage1(cfg, stage1), num_classes)
    _load_state(model.fc, best["fc"], str(path / "checkpoints/linear_best.pt"))
    _load_state(model.norm, best["norm"], str(path / "checkpoints/linear_best.pt"))
    return model.eval()


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
