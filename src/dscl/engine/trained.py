"""A finished run read back: its classifier and its model card, ``model.json``.

``model.json`` is written at the end of a run and holds what reusing the classifier needs
without the training data: class names, input size and normalisation, training counts per
class, and the dscl version. Run folders from before it existed fall back to ``config.yaml``
and ``results.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..version import __version__
from ..weights import run_folder
from ..config import Config, load_config
from ..data import DataSplits, eval_transform
from ..data.datasets import folder_image_size
from ..errors import CheckpointError
from ..models import Classifier, ExpertClassifier, build_backbone, build_classifier
from ..files import write_json
from .distributed import resolve_device
from .linear import backbone_from_stage1, selection_of
from .rundir import RunDir
from .views import normalisation

CARD = "model.json"
CARD_KEYS = ("method", "backbone", "classes", "image_size", "mean", "std")
_NATIVE_SIZE = {"synthetic": 32, "cifar10-lt": 32, "cifar100-lt": 32, "imagenet-lt": 224, "places-lt": 224,
                "inat2018": 224}


def stage1_state(run: RunDir, checkpoint: str | Path | None = None) -> dict:
    """The model state dict of the finished stage 1, ``checkpoints/pretrain.pt``; ``checkpoint``:
    another stage-1 checkpoint of the run (``checkpoints/pretrain_last.pt``, a copy), checked alike."""
    path = run.checkpoint("pretrain") if checkpoint is None else Path(checkpoint)
    if checkpoint is None and not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint; stage 1 did not finish (run `dscl pretrain` first)")
    state = run.load(path)  # refuses a missing file, a file not written by dscl, or one of another run
    if state.get("stage") != "pretrain" or not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{path}: not a finished stage-1 checkpoint (stage {state.get('stage')!r})")
    return state["model"]


def load_classifier(cfg: Config, run: RunDir, num_classes: int | None = None,
                    state: dict | None = None) -> tuple[Classifier | ExpertClassifier, dict]:
    """The run's classifier (on the CPU) and what results.json says of the stage-2 epoch kept.

    For a method without stage 2 (``ce``, ``ce-la``), the network trained end to end in stage 1
    (``checkpoints/pretrain.pt``); otherwise the stage-1 backbone with the kept stage-2 linear layer and its feature
    standardisation (``checkpoints/linear_best.pt``), one of each per expert with ``model.experts > 1``.
    ``state``: the stage-1 model state when the caller has it; ``num_classes``: what the
    checkpoint must hold, when known.
    """
    state = stage1_state(run) if state is None else state
    if not cfg.method_spec.stage2:
        path = run.checkpoint("pretrain")
        model = Classifier(build_backbone(cfg.model.backbone, zero_init_residual=False),
                           _classes_in(state, "fc.weight", num_classes, path))
        load_weights(model, state, path)
        return model, {}
    path = run.checkpoint("linear_best")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint; stage 2 did not finish (run `dscl linear` first)")
    best = run.load(path)
    if best.get("stage") != "linear" or not best.get("complete") or not isinstance(best.get("fc"), dict):
        raise CheckpointError(f"{path}: stage 2 did not finish; run `dscl linear` first")
    try:
        backbone = backbone_from_stage1(cfg, state)
    except RuntimeError as exc:
        raise CheckpointError(f"{run.checkpoint('pretrain')}: does not fit model.backbone "
                              f"{cfg.model.backbone!r}: {exc}") from None
    weight = "weight" if cfg.model.experts == 1 else "linears.0.weight"  # ExpertLinear: one layer per expert
    model = build_classifier(backbone, _classes_in(best["fc"], weight, num_classes, path))
    load_weights(model.fc, best["fc"], path)
    load_weights(model.norm, best.get("norm", {}), path)
    return model, selection_of({"epoch": best.get("best_epoch"), "val": best.get("best_val")})


def _classes_in(state: dict, key: str, expected: int | None, path: Path) -> int:
    weight = state.get(key)
    if not isinstance(weight, Tensor) or weight.ndim != 2:
        raise CheckpointError(f"{path}: holds no classifier ({key} missing)")
    if expected is not None and weight.shape[0] != expected:
        raise CheckpointError(f"{path}: a classifier of {weight.shape[0]} classes, but the run has {expected}")
    return weight.shape[0]


def load_weights(module: nn.Module, state: dict, path: Path) -> None:
    """``module.load_state_dict(state)``; weights that do not fit raise a CheckpointError naming ``path``."""
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: does not fit this run's model: {exc}") from None


def preprocessing(size: int) -> str:
    """In words, what :func:`dscl.data.eval_transform` does to an image of this run."""
    geometry = (f"resize to {size}x{size}" if size <= 64
                else f"resize the short side to {int(size * 256 / 224)}, centre-crop {size}x{size}")
    return f"RGB; {geometry}; scale to [0, 1]; subtract mean, divide by std (per channel)"


def model_card(cfg: Config, splits: DataSplits, selection: dict | None) -> dict:
    """What ``model.json`` records about a run's classifier."""
    mean, std = normalisation(splits.image_size)
    experts = {"experts": cfg.model.experts} if cfg.model.experts > 1 else {}  # model.json of experts: 1 as before
    return {"dscl_version": __version__, "method": cfg.method, "backbone": cfg.model.backbone, **experts,
            "checkpoint": "checkpoints/linear_best.pt" if cfg.method_spec.stage2 else "checkpoints/pretrain.pt",
            "num_classes": splits.num_classes, "classes": list(splits.classes), "image_size": splits.image_size,
            "mean": list(mean), "std": list(std), "preprocessing": preprocessing(splits.image_size),
            "train_counts": splits.train_counts, "stage2": selection or None,
            "data": {"name": cfg.data.name, "root": cfg.data.root, "imbalance_ratio": cfg.data.imbalance_ratio}}


def write_model_card(run: RunDir, card: dict) -> None:
    if run.is_main:
        write_json(run.path / CARD, card)


def read_model_card(path: Path, cfg: Config) -> dict:
    """``model.json`` of the run folder ``path``; for older runs, the same from config.yaml and
    results.json (image size from the data set's native size)."""
    card_path = path / CARD
    if card_path.is_file():
        card = _read_json(card_path)
        missing = [k for k in CARD_KEYS if k not in card]
        if missing:
            raise CheckpointError(f"{card_path}: not a dscl model card (missing {', '.join(missing)})")
        return card
    results = _read_json(path / "results.json") if (path / "results.json").is_file() else {}
    size = cfg.data.image_size or _NATIVE_SIZE.get(cfg.data.name) or folder_image_size(cfg.data.root)
    if size is None:
        raise CheckpointError(f"{card_path}: missing (a run from before dscl wrote it), and the image size cannot be "
                              f"told without the images under data.root {cfg.data.root}; set data.image_size in "
                              f"{path / 'config.yaml'}")
    mean, std = normalisation(size)
    return {"dscl_version": None, "method": cfg.method, "backbone": cfg.model.backbone,
            "classes": results.get("classes"), "image_size": size, "mean": list(mean), "std": list(std),
            "preprocessing": preprocessing(size), "train_counts": results.get("train_counts"),
            "stage2": results.get("stage2")}


def _read_json(path: Path) -> dict:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable: {exc}") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return values


@dataclass
class TrainedClassifier:
    """A finished run's classifier in eval mode, ready for tensors.

    ``model(images)`` takes (N, 3, S, S) images, S = ``image_size``, normalised with ``mean``
    and ``std`` (``transform`` does all of it for a PIL image) and returns (N, C) logits; the
    ``classifier`` module is the backbone, feature standardisation and linear layer (with
    ``model.experts > 1``: one of each per expert, the logits their mean).
    """

    classifier: Classifier | ExpertClassifier
    classes: list[str]
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    card: dict
    path: Path

    @property
    def device(self) -> torch.device:
        return next(self.classifier.parameters()).device

    @property
    def transform(self):
        """PIL image -> normalised (3, S, S) tensor, as the run evaluated its test split."""
        return eval_transform(self.image_size, self.mean, self.std)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        return self.classifier(images.to(self.device))  # (N, C) logits


def read_run(run_dir: str | Path) -> tuple[RunDir, Config]:
    """The run folder ``run_dir`` (or the published weights of that name) opened for reading, and
    the config it was trained with; every checkpoint the RunDir loads is checked against that config."""
    path = run_folder(run_dir)
    cfg = load_config(path / "config.yaml")
    run = RunDir(path, is_main=False)
    run.config = cfg.to_dict()
    return run, cfg


def load(run_dir: str | Path, device: str | torch.device = "cpu") -> TrainedClassifier:
    """The classifier of the run in ``run_dir`` (or of the published weights of that name, see
    :func:`dscl.weights.published_names`) with its class names and input normalisation."""
    run, cfg = read_run(run_dir)
    path = run.path
    card = read_model_card(path, cfg)
    classes = card.get("classes")
    classifier, _ = load_classifier(cfg, run, len(classes) if classes else None)
    num_classes = classifier.fc.out_features
    classes = list(classes) if classes else [str(c) for c in range(num_classes)]
    device = device if isinstance(device, torch.device) else resolve_device(device)
    return TrainedClassifier(classifier.to(device).eval(), classes, int(card["image_size"]),
                             tuple(card["mean"]), tuple(card["std"]), card | {"classes": classes}, path)
