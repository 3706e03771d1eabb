"""Is a run's test split as sharp as its training images, and what does a difference cost each run?

    python benchmarks/sharpness_shift.py RUN [RUN ...] [--data-root DIR] [--sigmas 0 0.3 0.45 0.6] [--splits-only]

First it prints the mean absolute difference between neighbouring pixels (of the grey image, in
0-255 units) over the images of each split of the first run's data set: training, validation and
test (and test under each blur), and how many classes have sharper test images than training
images. Then, for each RUN (a run folder or published weights), the test top-1 (overall, Many /
Medium / Few) with the test images blurred by a Gaussian of each sigma in pixels (0: as they are)
before the run's own evaluation transform, and the same with post-hoc logit adjustment, tau
chosen on the (unblurred) validation split. A blur that brings the test images' sharpness to the
training images' is the one to read; a method whose accuracy moves a lot with it depends on a
property of the images that the test split does not share with the training split. One JSON line
per run and sigma.
``--splits-only``: the first line only (a run folder without weights will do).
"""

from __future__ import annotations

import argparse
import functools
import json

import numpy as np
import torch
from PIL import Image, ImageFilter

from dscl.config import load_config
from dscl.engine.evaluate import accuracy_report, posthoc_logit_adjustment, predict_logits
from dscl.engine.runner import load_data
from dscl.engine.trained import load
from dscl.engine.views import split_loader
from dscl.weights import run_folder


class Blurred(torch.utils.data.Dataset):
    """A split whose images go through a Gaussian blur of ``sigma`` pixels (PIL's radius). It
    shows the attributes the data path is chosen by (``pipeline_choice``), so that it is
    evaluated the way the split itself is: in-memory images stay in memory (blurred), a file
    list's sizes are probed on its files."""

    def __init__(self, dataset, sigma: float):
        self.dataset, self.sigma, self.targets = dataset, sigma, list(dataset.targets)
        if hasattr(dataset, "paths"):
            self.paths = dataset.paths

    @functools.cached_property
    def data(self) -> np.ndarray:
        """(N, H, W, 3) blurred images, only where the split holds its own in memory (else no
        such attribute), built on first use."""
        if not hasattr(self.dataset, "data"):
            raise AttributeError("data")
        return np.stack([np.asarray(self[i][0]) for i in range(len(self))])

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, label = self.dataset[i]
        return (image.filter(ImageFilter.GaussianBlur(self.sigma)) if self.sigma > 0 else image), label


def sharpness(image: Image.Image) -> float:
    """Mean absolute difference of neighbouring pixels of the grey image, rows and columns averaged."""
    grey = np.asarray(image.convert("RGB"), dtype=np.float32).mean(2)
    return float((np.abs(np.diff(grey, axis=0)).mean() + np.abs(np.diff(grey, axis=1)).mean()) / 2)


def sharpness_of(dataset) -> np.ndarray:
    """(N,) sharpness of every image of a split."""
    return np.array([sharpness(dataset[i][0]) for i in range(len(dataset))])


def split_sharpness(splits, sigmas: list[float] = ()) -> dict:
    """Mean sharpness of each split (and of the test split under each blur of ``sigmas``), and
    how the test split compares with the training split class by class."""
    out, per_class = {"sharpness": {}}, {}
    for name in ("train", "val", "test"):
        dataset = getattr(splits, name)
        if dataset is None:
            continue
        values, targets = sharpness_of(dataset), np.asarray(dataset.targets)
        out["sharpness"][name] = round(float(values.mean()), 2)
        per_class[name] = np.array([values[targets == c].mean() if (targets == c).any() else np.nan
                                    for c in range(len(splits.classes))])
    if "test" in per_class:
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = per_class["test"] / per_class["train"]
        ratio = ratio[np.isfinite(ratio)]  # classes in both splits, training images not all flat
        out["classes_with_sharper_test"] = f"{int((ratio > 1).sum())} of {len(ratio)}"
        out["test_over_train_median"] = round(float(np.median(ratio)), 2)
        out["test_blurred"] = {f"{sigma:g}": round(float(sharpness_of(Blurred(splits.test, sigma)).mean()), 2)
                               for sigma in sigmas if sigma > 0}
    return out


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)  # a group with no class has no accuracy


def run_config(run_dir: str, data_root: str | None):
    """The config a run was trained with, its data where ``data_root`` says it lies now."""
    return load_config(run_folder(run_dir) / "config.yaml", [f"data.root={data_root}"] if data_root else [])


def blur_curve(run_dir: str, data_root: str | None, sigmas: list[float]):
    """One row per sigma: the run's test top-1 with the test images blurred by it."""
    cfg = run_config(run_dir, data_root)
    model, splits = load(run_dir), load_data(cfg)
    counts = model.card.get("train_counts") or splits.train_counts

    def logits(dataset):
        loader = split_loader(cfg, dataset, model.image_size, model.device)
        return predict_logits(model.classifier, loader, device=model.device, progress=False)

    val = logits(splits.val) if splits.val is not None else None
    for sigma in sigmas:
        test_logits, labels = logits(Blurred(splits.test, sigma))
        report = accuracy_report(test_logits.argmax(1), labels, counts)
        row = {"run": str(run_dir), "method": model.card.get("method"), "sigma": sigma,
               **{k: _rounded(report[k]) for k in ("overall", "many", "medium", "few")}}
        if val is not None:
            adjusted = posthoc_logit_adjustment(val, (test_logits, labels), counts)
            row |= {"posthoc_la": _rounded(adjusted["overall"]), "tau": adjusted["tau"]}
        yield row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--data-root", help="where the runs' data set lies now (their data.root)")
    parser.add_argument("--sigmas", nargs="+", type=float, default=[0.0, 0.3, 0.45, 0.6])
    parser.add_argument("--splits-only", action="store_true", help="the splits' sharpness, no classifier")
    args = parser.parse_args()
    print(json.dumps(split_sharpness(load_data(run_config(args.runs[0], args.data_root)), args.sigmas)), flush=True)
    for run_dir in [] if args.splits_only else args.runs:
        for row in blur_curve(run_dir, args.data_root, args.sigmas):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
