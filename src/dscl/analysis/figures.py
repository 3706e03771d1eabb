"""Matplotlib without a display (Agg), PNG bytes, atomic PNG files, heat-map overlays."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig, dpi: int = 100) -> bytes:
    """The figure as PNG bytes; closes it."""
    plt = pyplot()
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return buffer.getvalue()


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Write the figure as a PNG, whole or not at all; closes it."""
    from ..files import atomic_write_bytes

    path = Path(path)
    data = figure_png(fig, dpi)
    atomic_write_bytes(path, lambda fh: fh.write(data))
    return path


def short(name: str, width: int = 14) -> str:
    """A class name cut to ``width`` characters for a figure title."""
    return name if len(name) <= width else name[: width - 1] + "\u2026"


def upsample(heat: torch.Tensor, size: int) -> np.ndarray:
    """(h, w) map -> (size, size), bilinear, scaled to [0, 1]."""
    heat = F.interpolate(heat[None, None].float(), size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    heat = heat - heat.min()
    return (heat / heat.max().clamp(min=1e-12)).numpy()


def show_image(ax, pixels: np.ndarray, title: str = "", heat: np.ndarray | None = None) -> None:
    """An image on ``ax`` with an optional [0, 1] heat map over it, no axes."""
    ax.imshow(pixels, interpolation="nearest")
    if heat is not None:
        ax.imshow(heat, cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0, interpolation="bilinear")
    ax.set_title(title, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
