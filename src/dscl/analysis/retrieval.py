"""Patch-query retrieval with response maps (paper Fig. 1 and 4).

A box on a query image is pooled from the backbone's last feature map ``u`` as PBSD pools its
teacher (Eq. 11): ROI-align to 2 x 2 at ``1 / stride``, averaged, projected by the head ``g``
and normalised. Gallery images are ranked by the cosine similarity of that patch feature with
their own ``normalize(g(v))``, the space in which PBSD compares a patch with the queue's keys.
The response map on a retrieved image is the same similarity at each cell of its ``u``.
A run without a projection head (``ce``, ``crt``) uses the backbone's features on both sides; a run
with ``model.experts > 1`` each expert's head on its own feature map, the similarities averaged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from .figures import pyplot, save_figure, short, show_image, upsample


class FeatureSpace(nn.Module):
    """Backbone ``f`` and optional head ``g``: image, patch and per-cell features, normalised."""

    def __init__(self, backbone: nn.Module, head: nn.Module | None = None):
        super().__init__()
        self.backbone, self.head = backbone, head

    def embed(self, x: Tensor) -> Tensor:  # (N, C) -> (N, D)
        return F.normalize(self.head(x) if self.head is not None else x, dim=1)

    def feature_map(self, images: Tensor) -> Tensor:  # (N, 3, S, S) -> u: (N, C, h, w)
        return self.backbone.forward_features(images)

    def image(self, u: Tensor) -> Tensor:  # (N, C, h, w) -> (N, D)
        return self.embed(u.mean((2, 3)))

    def patch(self, u: Tensor, boxes: Tensor) -> Tensor:
        """One box per image, (N, 4) as x1, y1, x2, y2 in input pixels -> (N, D) (Eq. 11)."""
        pooled = roi_align(u, [b[None] for b in boxes.to(u.dtype)], output_size=2,
                           spatial_scale=1.0 / self.backbone.stride, sampling_ratio=2, aligned=True)
        return self.embed(pooled.mean((2, 3)))

    def cells(self, u: Tensor) -> Tensor:  # (N, C, h, w) -> (N, h, w, D)
        n, c, h, w = u.shape
        return self.embed(u.permute(0, 2, 3, 1).reshape(-1, c)).view(n, h, w, -1)


@torch.no_grad()
def gallery_features(space: FeatureSpace, loader, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Image features (N, D) and labels (N,) of every (images, labels) batch, in order."""
    space.eval()
    features, labels = [], []
    for images, targets in loader:
        features.append(space.image(space.feature_map(images.to(device))).float().cpu())
        labels.append(torch.as_tensor(targets).cpu())
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def retrieve(space: FeatureSpace, query: Tensor, box, gallery: Tensor, k: int = 3,
             exclude: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The ``k`` gallery rows most similar to the patch ``box`` of ``query`` (3, S, S).

    Returns (indices (k,), similarities (k,), the patch feature (D,)); ``exclude``: a gallery
    row never returned (the query image itself, when it is in the gallery).
    """
    space.eval()
    patch = space.patch(space.feature_map(query[None]), torch.tensor([box], dtype=torch.float32))[0]
    sims = gallery.to(patch.device) @ patch  # (N,)
    if exclude is not None:
        sims[exclude] = -float("inf")
    top = sims.topk(min(k, len(sims)))
    return top.indices.cpu(), top.values.cpu(), patch


@torch.no_grad()
def response_maps(space: FeatureSpace, images: Tensor, patch: Tensor) -> Tensor:
    """Cosine similarity of ``patch`` (D,) with each cell of each image's feature map: (N, h, w)."""
    space.eval()
    return space.cells(space.feature_map(images)) @ patch.to(images.device)


@dataclass
class RetrievalRow:
    """One run's answer to the query, ready to draw."""

    name: str
    query_pixels: object  # (S, S, 3) uint8
    box: tuple[float, float, float, float]
    pixels: list  # k images (S, S, 3) uint8
    titles: list[str]
    maps: list  # k (S, S) arrays in [0, 1]


def plot_retrieval(path: str | Path, rows: list[RetrievalRow]) -> Path:
    """One row per run: the query with its box (yellow), then the retrieved images with the
    patch's response map over each."""
    plt = pyplot()
    from matplotlib.patches import Rectangle

    k = max(len(r.pixels) for r in rows)
    fig, axes = plt.subplots(len(rows), k + 1, figsize=(1.6 * (k + 1), 1.75 * len(rows)), squeeze=False)
    for row, ax_row in zip(rows, axes):
        show_image(ax_row[0], row.query_pixels, f"query ({row.name})")
        x1, y1, x2, y2 = row.box
        ax_row[0].add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, edgecolor="yellow",
                                      linewidth=2))
        for j, ax in enumerate(ax_row[1:]):
            if j < len(row.pixels):
                show_image(ax, row.pixels[j], row.titles[j], row.maps[j])
            else:
                ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def random_box(size: int, scale: tuple[float, float], seed: int = 0) -> tuple[float, float, float, float]:
    """A box drawn as PBSD draws its patches (area fraction in ``scale``, aspect 3/4 to 4/3)."""
    from ..data import ViewPatchTransform

    torch.manual_seed(seed)
    return tuple(float(v) for v in ViewPatchTransform(size, 1, num_patches=1, patch_scale=scale).sample_box())


class ExpertHeads(nn.Module):
    """The heads of a multi-expert stage 1 as one: (N, E*c) features -> each expert's normalised
    projection of its slice, side by side and scaled by 1/sqrt(E), so that a cosine similarity is
    the mean of the experts' own (each in the space its PBSD term compares in)."""

    def __init__(self, heads: nn.ModuleList):
        super().__init__()
        self.heads = heads

    def forward(self, x: Tensor) -> Tensor:
        parts = x.chunk(len(self.heads), 1)
        return torch.cat([F.normalize(g(v), dim=1) for g, v in zip(self.heads, parts)], 1) / len(self.heads) ** 0.5


def _space_of(run, cfg, num_classes: int) -> FeatureSpace:
    from ..engine.trained import load_classifier
    from ..models import MultiExpertContrast
    from .runs import stage1_model

    if not cfg.method_spec.contrastive:  # no projection head: the classifier's backbone
        return FeatureSpace(load_classifier(cfg, run, num_classes)[0].backbone)
    model = stage1_model(run, cfg, num_classes)
    return FeatureSpace(model.encoder, ExpertHeads(model.heads) if isinstance(model, MultiExpertContrast)
                        else model.head)


def analyze_retrieval(runs: list[str | Path], out: str | Path, *, image: str | Path | None = None,
                      index: int = 0, split: str = "test", box=None, k: int = 3, seed: int = 0,
                      data_root: str | Path | None = None, device: str = "auto") -> list[RetrievalRow]:
    """Fig. 1 / 4 for one or more runs: the top-``k`` training images for a patch of one image
    (a file, or image ``index`` of ``split``), each with its response map; writes ``out`` (PNG).
    ``box``: x1, y1, x2, y2 in pixels of the S x S network input; None: drawn at random as PBSD
    draws its patches (with ``seed``)."""
    from ..engine.views import split_loader
    from ..errors import ArgumentError
    from .runs import check_box, device_of, image_from_file, image_from_split, load_data, open_run, view_image

    if not runs:
        raise ArgumentError("give at least one run folder")
    if k < 1:
        raise ArgumentError(f"--k {k}: must be >= 1")
    dev = device_of(device)
    rows, query, chosen = [], None, box
    for run in runs:
        opened, cfg = open_run(run, data_root)
        splits = load_data(cfg)
        size = splits.image_size
        if query is None:
            query = image_from_file(image, size) if image is not None else image_from_split(splits, split, index)
            chosen = check_box(box, size) if box is not None else random_box(size, cfg.pretrain.patch_scale, seed)
        space = _space_of(opened, cfg, splits.num_classes).to(dev)
        gallery, labels = gallery_features(space, split_loader(cfg, splits.train, size, dev), dev)
        exclude = index if image is None and split == "train" else None
        top, sims, patch = retrieve(space, query.input.to(dev), chosen, gallery, k, exclude)
        shown = [view_image(splits.train[int(i)][0], size) for i in top]
        maps = response_maps(space, torch.stack([v.input for v in shown]).to(dev), patch).cpu()
        titles = [f"{short(splits.classes[int(labels[i])])} {float(s):.3f}" for i, s in zip(top, sims)]
        rows.append(RetrievalRow(cfg.method, query.pixels, chosen, [v.pixels for v in shown], titles,
                                 [upsample(m, size) for m in maps]))
    plot_retrieval(out, rows)
    return rows
