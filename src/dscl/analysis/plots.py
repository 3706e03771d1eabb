"""Plots of a run from its files: per-class accuracy against class size, and training curves.

``results.json`` gives the per-class test accuracy and the training images per class;
``metrics.csv`` one row per epoch of each stage (losses, lr, the ``knn_top1`` health signal of
stage 1, ``val_top1`` of stage 2). The same figures overlay several runs in ``dscl report``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .figures import pyplot, save_figure

GROUP_EDGES = (20, 100)  # Few < 20 <= Medium <= 100 < Many training images (the paper's groups)
NOT_LOSSES = {"stage", "epoch", "lr", "seconds", "images_per_s", "p_key", "knn_top1", "val_top1"}


def read_results(path: str | Path) -> dict | None:
    file = Path(path) / "results.json"
    return json.loads(file.read_text()) if file.is_file() else None


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of ``metrics.csv`` with numbers as floats and empty cells left out; [] without one."""
    file = Path(path) / "metrics.csv"
    if not file.is_file():
        return []
    rows = []
    with open(file, newline="") as fh:
        for raw in csv.DictReader(fh):
            row = {}
            for key, value in raw.items():
                if key is None or value in (None, ""):
                    continue
                try:
                    row[key] = float(value) if key != "stage" else value
                except ValueError:
                    row[key] = value
            rows.append(row)
    return rows


def per_class_figure(runs: list[tuple[str, list[int], list[float | None]]], colours: list[str] | None = None):
    """Per-class test top-1 against training images (log x), one line per run, with the Few /
    Medium / Many bands shaded."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    counts = [n for _, c, _ in runs for n in c if n > 0] or [1, 1000]
    lo, hi = min(counts) / 1.5, max(counts) * 1.5
    edges = [lo, *GROUP_EDGES, hi]
    for (left, right), name, colour in zip(zip(edges, edges[1:]), ("Few", "Medium", "Many"),
                                           ("#f4cccc", "#fff2cc", "#d9ead3")):
        if right > lo and left < hi:
            ax.axvspan(max(left, lo), min(right, hi), color=colour, alpha=0.6, zorder=0)
            ax.text((max(left, lo) * min(right, hi)) ** 0.5, 101, name, ha="center", va="bottom", fontsize=8)
    colours = colours or [f"C{n % 10}" for n in range(len(runs))]
    for (name, train_counts, per_class), colour in zip(runs, colours):
        points = sorted((n, a) for n, a in zip(train_counts, per_class) if a is not None and n > 0)
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label=name, color=colour)
    log_count_axis(ax, lo, hi)
    ax.set_ylim(0, 108)
    ax.set_xlabel("training images of the class (log scale)")
    ax.set_ylabel("test top-1 of the class (%)")
    ax.grid(alpha=0.3)
    if runs:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def log_count_axis(ax, lo: float, hi: float) -> None:
    """A log x axis of class sizes, labelled 1, 2, 5, 10, 20, 50, ... in plain numbers."""
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ticks = [m * 10**e for e in range(7) for m in (1, 2, 5) if lo <= m * 10**e <= hi]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())


def curves_figure(runs: list[tuple[str, list[dict]]], colours: list[str] | None = None):
    """Training curves, one colour per run: stage-1 losses, p(k_i | z_i) and k-NN top-1 (its
    health signals); the lr of both stages, stage-2 loss and validation top-1."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    (losses, p_key, knn), (lr, loss2, val) = axes
    colours = colours or [f"C{n % 10}" for n in range(len(runs))]
    many = len(runs) > 1
    for (name, rows), colour in zip(runs, colours):
        stage1 = [r for r in rows if r.get("stage") == "pretrain"]
        linear = [r for r in rows if r.get("stage") == "linear"]
        names = [k for k in dict.fromkeys(k for r in stage1 for k in r) if k not in NOT_LOSSES]
        names = [k for k in names if k == "loss" or any(r.get(k) != r.get("loss") for r in stage1)]  # not a copy
        for style, key in zip(["-", "--", ":", "-."] * 3, names):
            _line(losses, stage1, key, colour, style, f"{name}: {key}" if many else key)
        _line(p_key, stage1, "p_key", colour, "-", name)
        _line(knn, stage1, "knn_top1", colour, "-", name, marker="o")
        _line(lr, stage1, "lr", colour, "-", f"{name}: stage 1" if many else "stage 1")
        _line(lr, linear, "lr", colour, "--", f"{name}: stage 2" if many else "stage 2")
        _line(loss2, linear, "loss", colour, "-", name)
        _line(val, linear, "val_top1", colour, "-", name)
    for ax, title, ylabel in [(losses, "stage 1: losses", "loss"), (p_key, "stage 1: p(k_i | z_i)", "probability"),
                              (knn, "stage 1: k-NN top-1 on validation", "%"), (lr, "learning rate", "lr"),
                              (loss2, "stage 2: loss", "cross-entropy"), (val, "stage 2: validation top-1", "%")]:
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch of the stage", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
        if not ax.lines:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
        elif ax in (losses, lr) or many:
            ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def _line(ax, rows: list[dict], key: str, colour: str, style: str, label: str | None, marker: str | None = None):
    points = [(r["epoch"], r[key]) for r in rows if isinstance(r.get(key), float) and "epoch" in r]
    if points:
        ax.plot(*zip(*points), color=colour, linestyle=style, marker=marker, markersize=3, label=label)


def plot_run(path: str | Path) -> list[Path]:
    """Write ``per_class.png`` (needs results.json) and ``curves.png`` (needs metrics.csv) into
    the run folder; returns the files written."""
    path, written = Path(path), []
    results, rows = read_results(path), read_metrics(path)
    name = results.get("method", path.name) if results else path.name
    if results and results.get("per_class"):
        written.append(save_figure(per_class_figure([(name, results["train_counts"], results["per_class"])]),
                                   path / "per_class.png"))
    if rows:
        written.append(save_figure(curves_figure([(name, rows)]), path / "curves.png"))
    return written


def plot_finished_run(path: str | Path) -> None:
    """What the commands do after a run finished: per_class.png and curves.png in its folder,
    named in its log. A failure to plot is logged and never fails the run."""
    from ..engine.rundir import RunDir

    run_dir = RunDir(path)
    try:
        written = plot_run(run_dir.path)
    except Exception as exc:  # noqa: BLE001 - a plot is never worth a failed run
        run_dir.log(f"plots not written ({type(exc).__name__}: {exc}); the run's results are complete")
        return
    if written:
        run_dir.log("plots: " + ", ".join(str(p.name) for p in written))
