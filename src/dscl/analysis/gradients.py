"""Gradient-norm ratio of the two kinds of positives, per class (paper Eq. 6, 10 and Fig. 2).

For anchor ``z_i`` with logits ``s_ia = z_i . a / tau`` over its candidates ``A_i``, the gradient
of its loss is a sum of one part per candidate::

    d loss_i / d z_i = sum_{a in A_i} (d loss_i / d s_ia) * a / tau

The ratio measured here is ``r_i = ||part of k_i|| / sum_{a in P_i} ||part of a||``: its own
augmented view against the other images of its class. At initialisation (all ``p(a|z_i)`` small)
``r_i ~ 1 / |P_i|`` for SCL, which shrinks with the class's share of the data, and
``r_i ~ alpha / (1 - alpha)`` for DSCL, whatever the class.

The parts come from autograd through the library's loss (:func:`decoupled_supcon_loss`), one
anchor at a time, its other candidates (the batch's other queries and keys, the valid queue)
passed as that anchor's "queue". ``z_i`` and every candidate are unit vectors, so the norm of
a's part of ``d loss_i / d z_i``, ``|d loss_i / d s_ia| / tau``, is also the norm of
``d loss_i / d a``, which is what autograd returns for the leaf ``a``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..losses import decoupled_supcon_loss
from ..models import MomentumContrast
from .figures import pyplot, save_figure
from .plots import log_count_axis


def anchor_gradient_ratios(query: Tensor, key: Tensor, labels: Tensor, queue: Tensor, queue_labels: Tensor,
                           alpha: float | None, temperature: float = 0.07) -> tuple[Tensor, Tensor]:
    """Per anchor of a batch: ``r_i`` (NaN when ``P_i`` is empty) and ``|P_i|``, both (B,).

    query, key: (B, D) L2-normalised; labels: (B,); queue: (K, D); queue_labels: (K,), -1 for
    an empty slot. ``alpha=None``: SCL, else DSCL with that alpha (the library's convention).
    """
    keep = queue_labels >= 0
    queue, queue_labels = queue[keep].detach().float().cpu(), queue_labels[keep].long().cpu()
    query, key, labels = query.detach().float().cpu(), key.detach().float().cpu(), labels.long().cpu()
    b = query.shape[0]
    ratios, sizes = torch.full((b,), float("nan")), torch.zeros(b, dtype=torch.long)
    for i in range(b):
        others = torch.arange(b) != i
        candidates = torch.cat([query[others], key[others], queue]).requires_grad_(True)  # (2B-2+K, D)
        candidate_labels = torch.cat([labels[others], labels[others], queue_labels])
        own_key = key[i : i + 1].clone().requires_grad_(True)  # (1, D)
        loss = decoupled_supcon_loss(query[i : i + 1], own_key, labels[i : i + 1], candidates, candidate_labels,
                                     alpha=alpha, temperature=temperature)
        grad_key, grad_candidates = torch.autograd.grad(loss, (own_key, candidates))
        positive = candidate_labels == labels[i]
        sizes[i] = int(positive.sum())
        if sizes[i] > 0:
            ratios[i] = grad_key.norm() / grad_candidates[positive].norm(dim=1).sum()
    return ratios, sizes


@dataclass
class GradientRatios:
    """Per-class means over the anchors that had at least one same-class positive."""

    classes: list[str]
    train_counts: list[int]
    alpha: float
    scl: list[float | None]  # mean r_i under SCL
    dscl: list[float | None]  # mean r_i under DSCL
    scl_theory: list[float | None]  # mean 1 / |P_i|
    mean_positives: list[float | None]  # mean |P_i|
    anchors: list[int]  # anchors that entered the means
    batches: int
    source: str  # which weights: a checkpoint, or the initialisation

    @property
    def dscl_theory(self) -> float:
        return self.alpha / (1.0 - self.alpha) if self.alpha < 1 else math.inf

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "dscl_theory": self.dscl_theory}, indent=2) + "\n"


class _ClassMeans:
    def __init__(self, num_classes: int):
        self.sums = torch.zeros(4, num_classes, dtype=torch.float64)  # scl, dscl, 1/|P|, |P|
        self.counts = torch.zeros(num_classes, dtype=torch.float64)

    def add(self, labels: Tensor, scl: Tensor, dscl: Tensor, sizes: Tensor) -> None:
        ok, labels = sizes > 0, labels.cpu()
        labels, values = labels[ok].cpu(), torch.stack([scl[ok], dscl[ok], 1.0 / sizes[ok], sizes[ok].double()])
        self.sums.index_add_(1, labels, values.double())
        self.counts.index_add_(0, labels, torch.ones(len(labels), dtype=torch.float64))

    def means(self) -> list[list[float | None]]:
        return [[float(s / n) if n > 0 else None for s, n in zip(row, self.counts)] for row in self.sums]


@torch.no_grad()
def _features(model: MomentumContrast, query_view: Tensor, key_view: Tensor) -> tuple[Tensor, Tensor]:
    """z and k of a batch as in training (BatchNorm on batch statistics, shuffled key groups),
    with no momentum update. (B, D) each."""
    query = F.normalize(model.head(model.encoder(query_view)), dim=1)
    return query, model.encode_keys(key_view)


def class_gradient_ratios(model: MomentumContrast, batches, *, num_classes: int, alpha: float,
                          temperature: float = 0.07, max_batches: int = 20, fill_batches: int | None = None,
                          device: torch.device | str = "cpu") -> tuple[list[list[float | None]], list[int], int]:
    """Stream ``(views, labels)`` batches of stage-1 views through ``model`` and average the
    ratios per class under SCL and under DSCL with ``alpha``.

    The queue starts as the model holds it; while it has empty slots (at initialisation), up
    to ``fill_batches`` batches (None: enough to fill it once) only fill it. After each measured
    batch its keys are enqueued, as in training. The model's weights are never changed; its
    BatchNorm running statistics may be.

    Returns ``([scl, dscl, mean 1/|P_i|, mean |P_i|], anchors per class, measured batches)``.
    """
    model.train()
    means, measured, filled, filled_keys = _ClassMeans(num_classes), 0, 0, 0
    for (query_view, key_view, *_), labels in batches:
        if measured >= max_batches:
            break
        query, key = _features(model, query_view.to(device), key_view.to(device))
        labels = labels.to(device)
        queue = model.queue
        room = filled_keys < queue.size if fill_batches is None else filled < fill_batches
        if bool((queue.labels < 0).any()) and room:  # a class-balanced queue may never fill: bounded
            filled, filled_keys = filled + 1, filled_keys + len(labels)
        else:
            scl, sizes = anchor_gradient_ratios(query, key, labels, queue.keys, queue.labels, None, temperature)
            dscl, _ = anchor_gradient_ratios(query, key, labels, queue.keys, queue.labels, alpha, temperature)
            means.add(labels, scl, dscl, sizes)
            measured += 1
        queue.enqueue(key, labels)
    return means.means(), [int(n) for n in means.counts], measured


def plot_gradient_ratios(path: str | Path, result: GradientRatios) -> None:
    """Measured ratios per class against its training images (log-log), with the theory:
    ``1 / |P_i|`` for SCL (stars, from the measured ``|P_i|``) and ``alpha / (1 - alpha)``."""
    plt = pyplot()
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    order = sorted(range(len(result.train_counts)), key=lambda c: result.train_counts[c])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for values, style, label in [(result.scl, dict(marker="o", color="tab:blue"), "SCL, measured"),
                                 (result.scl_theory, dict(marker="*", color="tab:blue", linestyle="--", alpha=0.6,
                                                          markersize=9), "SCL* = 1/|P_i|"),
                                 (result.dscl, dict(marker="s", color="tab:red"),
                                  f"DSCL (alpha={result.alpha:g}), measured")]:
        points = [(result.train_counts[c], values[c]) for c in order if values[c] is not None]
        if points:
            ax.plot(*zip(*points), label=label, **style)
    ax.axhline(result.dscl_theory, color="tab:red", linestyle="--", alpha=0.6,
               label=f"DSCL* = alpha/(1-alpha) = {result.dscl_theory:.3g}")
    counts = [n for n in result.train_counts if n > 0] or [1, 10]
    log_count_axis(ax, min(counts) / 1.3, max(counts) * 1.3)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("training images of the class (log scale)")
    ax.set_ylabel("ratio r_i (own key : same-class positives)")
    ax.set_title(f"Gradient-norm ratio of the two kinds of positives\n{result.source}, {result.batches} batches",
                 fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def analyze_gradients(run: str | Path, out: str | Path, *, checkpoint: str | Path | None = None,
                      initial: bool = False, alpha: float | None = None, batches: int = 20,
                      fill_batches: int | None = None, seed: int = 0, data_root: str | Path | None = None,
                      device: str = "auto") -> GradientRatios:
    """Fig. 2 for the run in ``run``: its stage-1 checkpoint (or ``initial`` weights), a stream
    of ``batches`` training batches, ratios under SCL and DSCL; writes ``out`` (PNG) and the
    numbers beside it (``out`` with ``.json``). ``alpha``: DSCL's weight (default: the run's,
    0.1 for an SCL run)."""
    from ..engine.distributed import Runtime
    from ..engine.loaders import EpochBatches, shuffled_order, steps_per_epoch
    from ..engine.views import stage1_transform
    from ..errors import ArgumentError
    from .runs import as_contrastive, device_of, load_data, open_run, single_expert, stage1_model

    opened, cfg = open_run(run, data_root)
    single_expert(opened, cfg, "the ratio is measured through one projection head and one queue, and each expert "
                               "has its own")
    if batches < 1:
        raise ArgumentError(f"--batches {batches}: must be >= 1")
    alpha = alpha if alpha is not None else (cfg.alpha if cfg.alpha is not None else 0.1)
    if not 0 <= alpha < 1:
        raise ArgumentError(f"--alpha {alpha}: must lie in [0, 1)")
    dev = device_of(device)
    splits = load_data(cfg)
    model = stage1_model(opened, cfg, splits.num_classes, checkpoint, initial=initial).to(dev)
    views_cfg = as_contrastive(cfg)  # plain two-view batches: the ratio needs no patches
    rt = Runtime(0, 1, dev)
    batch = cfg.pretrain.batch_size
    stream = EpochBatches(views_cfg, splits.train,
                          lambda on_device: stage1_transform(views_cfg, splits.image_size, on_device),
                          rt, batch=batch, seed=seed)
    steps = steps_per_epoch(len(splits.train), batch, None)

    def endless():
        epoch = 0
        while True:
            yield from stream.epoch(shuffled_order(len(splits.train), seed, epoch, rt, steps, batch), epoch, 0)
            epoch += 1

    torch.manual_seed(seed)
    means, anchors, measured = class_gradient_ratios(model, endless(), num_classes=splits.num_classes, alpha=alpha,
                                                     temperature=cfg.pretrain.temperature, max_batches=batches,
                                                     fill_batches=fill_batches, device=dev)
    source = "initial weights" if initial else f"{cfg.method} run, {Path(checkpoint or 'pretrain.pt').name}"
    result = GradientRatios(splits.classes, splits.train_counts, alpha, *means, anchors, measured, source)
    plot_gradient_ratios(out, result)
    from ..files import atomic_write_text

    atomic_write_text(Path(out).with_suffix(".json"), result.to_json())
    return result
