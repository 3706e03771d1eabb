"""Weights published with dscl: slim run folders (``dscl export --format run``) named by their
path under this folder, e.g. ``tinyimagenet-lt-r100/ce``; the table is this folder's README.md."""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError

FOLDER = Path(__file__).resolve().parent


def published_names() -> list[str]:
    """Names of the weights published with dscl, e.g. ``tinyimagenet-lt-r100/ce``."""
    return sorted(str(p.parent.relative_to(FOLDER)) for p in FOLDER.rglob("config.yaml"))


def run_folder(run_dir: str | Path) -> Path:
    """``run_dir`` when it is a run folder; else the published weights of that name."""
    path = Path(run_dir)
    if (path / "config.yaml").is_file():
        return path
    if not path.exists() and str(run_dir) in published_names():
        return FOLDER / str(run_dir)
    if path.exists():
        raise CheckpointError(f"{path}: not a dscl run folder (no config.yaml)")
    raise CheckpointError(f"{path}: no such run folder, nor the name of published weights "
                          f"({', '.join(published_names()) or 'none'})")


def is_published(path: Path) -> bool:
    return Path(path).resolve().is_relative_to(FOLDER)
