"""Class activation maps of the stage-2 classifier (Zhou et al. 2016; supplement Fig. 1).

The classifier is linear on the pooled feature ``v = mean_cells(u)``::

    logit_c = sum_d W_cd (v_d - mu_d) / sigma_d + b_c            (mu, sigma: its standardisation)

Applying the same weights to every cell of the last feature map ``u`` gives the map
``M_c(y, x) = sum_d W_cd (u_d(y, x) - mu_d) / sigma_d + b_c``, whose mean over the cells is
exactly ``logit_c``: it shows where in the image the evidence for class ``c`` lies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..models import Classifier, ExpertClassifier
from .figures import pyplot, save_figure, short, show_image, upsample


@torch.no_grad()
def class_activation_maps(model: Classifier | ExpertClassifier, images: Tensor,
                          classes: Tensor) -> tuple[Tensor, Tensor]:
    """Maps of class ``classes[n]`` on image ``n``: (N, h, w); and the logits (N, C).

    images: (N, 3, S, S) normalised as for evaluation; classes: (N,) int. With experts the map is
    the mean of the experts' maps, as the prediction is the mean of their logits.
    """
    model.eval()
    u = model.backbone.forward_features(images).float()  # (N, d, h, w); experts: their maps side by side
    weight, bias = _linear_of(model)
    w = weight[classes]  # (N, d)
    maps = torch.einsum("nd,ndhw->nhw", w, u) + bias[classes][:, None, None]
    logits = model.head(u.mean((2, 3)))
    return maps, logits


def _linear_of(model: Classifier | ExpertClassifier) -> tuple[Tensor, Tensor]:
    """The classifier as one linear map of the pooled features v: logits = weight @ v + bias."""
    if isinstance(model, ExpertClassifier):  # the mean over experts e of W_e (v_e - mu_e) / sigma_e + b_e
        parts = [_linear_of_layer(fc, norm) for fc, norm in zip(model.fc.linears, model.norm.experts)]
        return (torch.cat([w for w, _ in parts], 1) / len(parts),
                torch.stack([b for _, b in parts]).mean(0))
    return _linear_of_layer(model.fc, model.norm)


def _linear_of_layer(fc, norm) -> tuple[Tensor, Tensor]:
    weight = fc.weight / norm.std  # (C, d): W_cd / sigma_d
    return weight, fc.bias - weight @ norm.mean


@dataclass
class CamItem:
    pixels: object  # (S, S, 3) uint8
    heat: object  # (S, S) in [0, 1]
    title: str


def plot_cams(path: str | Path, items: list[CamItem], title: str = "") -> Path:
    """The images in a grid, each with its map over it."""
    plt = pyplot()
    cols = min(len(items), 5 if len(items) <= 10 else 8)
    rows = math.ceil(len(items) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.75 * rows + 0.3), squeeze=False)
    for ax, item in zip(axes.flat, items):
        show_image(ax, item.pixels, item.title, item.heat)
    for ax in list(axes.flat)[len(items):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def first_per_class(targets, classes: list[int], per_class: int) -> list[int]:
    """The first ``per_class`` indices of each class in ``classes``, class by class."""
    chosen = {c: [] for c in classes}
    for i, t in enumerate(targets):
        if int(t) in chosen and len(chosen[int(t)]) < per_class:
            chosen[int(t)].append(i)
    return [i for c in classes for i in chosen[c]]


def analyze_cam(run: str | Path, out: str | Path, *, images: list[str | Path] = (), per_class: int = 1,
                classes: list[str] | None = None, split: str = "test", target: str = "true",
                data_root: str | Path | None = None, device: str = "auto") -> list[CamItem]:
    """CAMs of the run's classifier: on the given image files (map of the predicted class), or
    on the first ``per_class`` images of each class (or of ``classes``) of ``split``, map of
    the ``true`` or the ``predicted`` class. Writes ``out`` (PNG)."""
    from ..engine.trained import load, load_classifier
    from ..errors import ArgumentError
    from .runs import device_of, image_from_file, image_from_split, load_data, open_run

    if target not in ("true", "predicted"):
        raise ArgumentError(f"--target {target}: must be true or predicted")
    if per_class < 1:
        raise ArgumentError(f"--per-class {per_class}: must be >= 1")
    run, cfg = open_run(run, data_root)
    dev = device_of(device)
    if images:  # class names and input size from model.json: image files need no data
        trained = load(run.path, dev)
        model, names, size = trained.classifier, trained.classes, trained.image_size
        viewed = [image_from_file(f, size) for f in images]
    else:
        splits = load_data(cfg)
        model = load_classifier(cfg, run, splits.num_classes)[0].to(dev).eval()
        names, size = splits.classes, splits.image_size
        dataset = {"train": splits.train, "val": splits.val, "test": splits.test}.get(split)
        if dataset is None:
            raise ArgumentError(f"--split {split}: this run's data has no {split} split")
        wanted = list(range(len(names))) if not classes else [_class_index(c, names) for c in classes]
        viewed = [image_from_split(splits, split, i) for i in first_per_class(dataset.targets, wanted, per_class)]
    batch = torch.stack([v.input for v in viewed]).to(dev)
    with torch.no_grad():
        predicted = model(batch).argmax(1)
    use_true = target == "true" and not images
    shown = torch.tensor([v.label for v in viewed], device=dev) if use_true else predicted
    maps, _ = class_activation_maps(model, batch, shown)
    items = []
    for v, m, p in zip(viewed, maps.cpu(), predicted.tolist()):
        truth = short(names[v.label]) if v.label is not None else short(v.name)
        items.append(CamItem(v.pixels, upsample(m, size), f"{truth} \u2192 {short(names[p])}"))
    plot_cams(out, items, f"CAM of the {'true' if use_true else 'predicted'} class (title: true \u2192 predicted), "
                          f"{cfg.method}")
    return items


def _class_index(name: str, classes: list[str]) -> int:
    from ..errors import ArgumentError

    if name in classes:
        return classes.index(name)
    if name.isdigit() and int(name) < len(classes):
        return int(name)
    raise ArgumentError(f"--classes {name}: not a class of this run ({', '.join(classes[:10])}"
                        f"{', ...' if len(classes) > 10 else ''})")
