"""A finished run on new inputs: ``dscl predict`` (image files) and ``dscl evaluate RUN_DIR``
(another split or data set). Neither writes into the run's own files."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .version import __version__
from .config import load_config
from .data import DATASET_NAMES, load_rgb
from .data.images import is_image_file
from .files import write_json
from .engine.evaluate import accuracy_report, posthoc_logit_adjustment, predict, predict_logits
from .engine.runner import load_data
from .progress import progress as progress_bar
from .engine.trained import TrainedClassifier, load
from .weights import FOLDER, is_published, run_folder
from .engine.views import split_loader
from .errors import ConfigError, DataError

EVAL_KEYS = ("data.", "eval_batch_size", "device")  # what `dscl evaluate RUN_DIR --set` may change


def image_files(inputs: list[str | Path]) -> tuple[list[str], list[tuple[str, str]], bool]:
    """(image files, [(input, why skipped)], whether any input was a folder). A folder gives its
    image files, recursively, in sorted order; a file is taken whatever its name."""
    files, skipped, folders = [], [], False
    for item in map(str, inputs):
        if os.path.isdir(item):
            folders = True
            found = sorted(os.path.join(d, f) for d, _, names in os.walk(item) for f in names if is_image_file(f))
            files += found
            if not found:
                skipped.append((item, "no image files in this folder"))
        elif os.path.isfile(item):
            files.append(item)
        else:
            skipped.append((item, "no such file or folder"))
    return files, skipped, folders


def predict_files(model: TrainedClassifier, files: list[str], *, topk: int = 5, batch_size: int = 64,
                  progress: bool = False) -> tuple[list[dict], list[tuple[str, str]]]:
    """Top-k classes and probabilities of each readable file, and [(file, why)] of the others."""
    topk = min(topk, len(model.classes))
    rows, skipped = [], []
    transform = model.transform

    def read(path: str):
        try:
            return transform(load_rgb(path))
        except DataError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool, \
            progress_bar(total=len(files), desc="predict", unit="image", leave=False, enabled=progress) as bar:
        for start in range(0, len(files), batch_size):
            batch = files[start : start + batch_size]
            images, kept = [], []
            for path, image in zip(batch, pool.map(read, batch)):
                if isinstance(image, Exception):
                    skipped.append((path, str(image)))
                else:
                    images.append(image)
                    kept.append(path)
            if images:
                probs = model(torch.stack(images)).float().softmax(1).cpu()  # (B, C)
                top_p, top_i = probs.topk(topk, dim=1)
                for path, p, i in zip(kept, top_p.tolist(), top_i.tolist()):
                    rows.append({"image": path, "top": [{"class": model.classes[c], "index": c, "probability": q}
                                                        for c, q in zip(i, p)]})
            bar.update(len(batch))
    return rows, skipped


def format_predictions(rows: list[dict], fmt: str) -> str:
    """The predictions as an aligned ``table``, ``json`` or long-form ``csv`` (one row per rank)."""
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["image", "rank", "class", "index", "probability"])
        for row in rows:
            for rank, top in enumerate(row["top"], start=1):
                writer.writerow([row["image"], rank, top["class"], top["index"], f"{top['probability']:.6f}"])
        return buffer.getvalue().rstrip("\n")
    k = max((len(r["top"]) for r in rows), default=1)
    table = [["image"] + [h for n in range(1, k + 1) for h in (f"top-{n}", "p")]]
    table += [[r["image"]] + [c for t in r["top"] for c in (t["class"], f"{t['probability']:.4f}")] for r in rows]
    widths = [max(len(line[c]) for line in table if c < len(line)) for c in range(len(table[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table)


def predict_command(run_dir: Path, inputs: list[str], *, topk: int, fmt: str, batch_size: int, device: str) -> int:
    """``dscl predict``: prints the predictions; returns 1 when any input was skipped, else 0."""
    if topk < 1 or batch_size < 1:
        raise ConfigError("--topk and --batch-size must be >= 1")
    model = load(run_dir, device)
    files, skipped, folders = image_files(inputs)
    rows, unreadable = predict_files(model, files, topk=topk, batch_size=batch_size, progress=folders)
    skipped += unreadable
    if rows or fmt != "table":
        print(format_predictions(rows, fmt))
    for path, why in skipped:
        print(f"dscl: skipped {path}: {why}", file=sys.stderr)
    if skipped:
        print(f"dscl: {len(skipped)} input(s) skipped, {len(rows)} image(s) predicted", file=sys.stderr)
    return 1 if skipped else 0


def _data_overrides(saved_name: str, data: str | None, overrides: list[str]) -> list[str]:
    """``--data`` (a data set name or a folder) and ``--set`` as config overrides of the run's data."""
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if not key.startswith(EVAL_KEYS[0]) and key not in EVAL_KEYS[1:]:
            raise ConfigError(f"--set {text!r}: evaluate changes only data.*, eval_batch_size and device; "
                              f"the model is the run's")
    if data is None:
        return list(overrides)
    if data in DATASET_NAMES:
        return [f"data.name={data}", *overrides]
    if os.path.isdir(data):
        name = ["data.name=imagefolder"] if saved_name == "synthetic" else []
        return [*name, f"data.root={data}", *overrides]
    raise ConfigError(f"--data {data!r}: neither a data set name ({', '.join(DATASET_NAMES)}) nor a folder")


def _label_map(model_classes: list[str], data_classes: list[str], where: str) -> tuple[torch.Tensor, str]:
    """Model index of each data label: by class name when both name the same classes, else by
    index when only their number agrees."""
    if list(data_classes) == list(model_classes):
        return torch.arange(len(model_classes)), "same classes"
    if sorted(data_classes) == sorted(model_classes):
        return torch.tensor([model_classes.index(c) for c in data_classes]), "matched by name"
    if len(data_classes) == len(model_classes):
        return torch.arange(len(model_classes)), "other class names, matched by index"
    raise DataError(f"{where}: {len(data_classes)} classes, but the model has {len(model_classes)}")


def _open_run(run_dir: Path, data: str | None, overrides: list[str]):
    """A finished run's config (its data changed by ``data`` / ``overrides``), its classifier
    and the splits of that data: what ``dscl evaluate RUN_DIR`` works on."""
    saved = load_config(run_dir / "config.yaml")
    cfg = load_config(run_dir / "config.yaml", _data_overrides(saved.data.name, data, list(overrides)))
    return cfg, load(run_dir, cfg.device), load_data(cfg)


def _results_path(run_dir: Path, results: Path | None, name: str) -> Path:
    """``results``, else RUN_DIR/evaluations/NAME; published weights stay as shipped: their
    evaluations go to ./evaluations/<weights name>/NAME."""
    if results:
        return Path(results)
    if is_published(run_dir):
        return Path("evaluations") / run_dir.resolve().relative_to(FOLDER) / name
    return run_dir / "evaluations" / name


def evaluate_run(run_dir: Path, data: str | None = None, overrides: list[str] = (), split: str = "test",
                 results: Path | None = None) -> dict:
    """Top-1 of the run's classifier on ``split`` of the run's data set changed by ``data`` /
    ``overrides``; writes ``results`` (default RUN_DIR/evaluations/<data set>-<split>.json)."""
    run_dir = run_folder(run_dir)
    tic = time.perf_counter()
    cfg, model, splits = _open_run(run_dir, data, overrides)
    dataset = getattr(splits, split)
    where = f"{cfg.data.name}" + (f" at {cfg.data.root}" if cfg.data.root else "")
    if dataset is None:
        raise DataError(f"{where}: has no {split} split")
    label_map, match = _label_map(model.classes, splits.classes, where)
    train_counts = model.card.get("train_counts") or splits.train_counts
    loader = split_loader(cfg, dataset, model.image_size, model.device)
    preds, labels = predict(model.classifier, loader, device=model.device, desc=split)
    report = accuracy_report(preds, label_map[labels], train_counts)
    out = {"run": str(run_dir), "method": model.card.get("method"), "split": split,
           "data": {"name": cfg.data.name, "root": cfg.data.root, "imbalance_ratio": cfg.data.imbalance_ratio},
           "images": len(labels), "class_match": match, "overall": report["overall"], "many": report["many"],
           "medium": report["medium"], "few": report["few"], "per_class": report["per_class"],
           "classes": model.classes, "train_counts": train_counts, "dscl_version": __version__,
           "seconds": round(time.perf_counter() - tic, 2)}
    path = _results_path(run_dir, results, f"{cfg.data.name}-{split}.json")
    write_json(path, out)
    print(f"{where}, {split} split ({len(labels)} images, {match}): top-1 {report['overall']:.2f}% -> {path}")
    return out


def logit_adjust_run(run_dir: Path, overrides: list[str] = (), results: Path | None = None) -> dict:
    """Post-hoc logit adjustment of a finished run's classifier on the run's own data set: tau
    chosen on its validation split, reported on its test split; the priors are the run's training
    counts. Writes ``results`` (default RUN_DIR/evaluations/posthoc-la.json, which ``dscl sweep
    --posthoc-la`` reads for runs whose results.json predates the adjustment)."""
    run_dir = run_folder(run_dir)
    cfg, model, splits = _open_run(run_dir, None, overrides)
    if splits.val is None:
        raise DataError(f"{run_dir}: its data set has no validation split to choose tau on (set data.val_per_class)")
    train_counts = model.card.get("train_counts") or splits.train_counts
    logits = {name: predict_logits(model.classifier, split_loader(cfg, getattr(splits, name), model.image_size,
                                                                  model.device), device=model.device, desc=name)
              for name in ("val", "test")}
    out = posthoc_logit_adjustment(logits["val"], logits["test"], train_counts)
    path = _results_path(run_dir, results, "posthoc-la.json")
    write_json(path, out)
    print(f"post-hoc logit adjustment: tau {out['tau']:g} (validation top-1 {out['val_top1']:.2f}%), "
          f"test top-1 {out['overall']:.2f}% -> {path}")
    return out
