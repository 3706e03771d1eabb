"""Output files written whole: through a temporary file in the same folder, fsync, then a
rename, so a crash never leaves a half-written file that looks complete."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from .errors import CheckpointError


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


def write_csv(path: Path, rows: list[dict], digits: int | None = None) -> None:
    """Rows to CSV (the columns: every key, in order of first appearance); floats rounded to
    ``digits`` decimals when given."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows if digits is None else
                     ({k: round(v, digits) if isinstance(v, float) else v for k, v in r.items()} for r in rows))
    atomic_write_text(path, buffer.getvalue())


def write_yaml(path: Path, data: Any) -> None:
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
