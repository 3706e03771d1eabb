"""k-NN top-1 of finished runs' stage-1 encoders on their validation split and on their test
split, side by side: does the representation carry from the held-out training images (which
choose every setting) to the test images?

A validation split drawn from the training images and a test split from elsewhere (Tiny
ImageNet's official validation folder, say) can differ; a gap that one method shows and another
does not is a warning that its validation figures overstate it.

    python benchmarks/knn_val_test.py RUN [RUN ...] [--data-root DIR] [--k 20] [--test-blur SIGMA]

``--test-blur``: the test images blurred by a Gaussian of SIGMA pixels first (see
``sharpness_shift.py``: Tiny ImageNet's test images here are sharper than its training images).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dscl.engine.evaluate import knn_predict
from dscl.engine.linear import clean_features
from sharpness_shift import Blurred  # this folder's
from stage2_selection import frozen_run  # this folder's: the run, its splits and its frozen encoder


def knn_val_test(run_dir: Path, data_root: str | None, k: int, test_blur: float = 0.0) -> dict:
    _, cfg, splits, rt, backbone = frozen_run(run_dir, data_root)
    bank, bank_labels = clean_features(backbone, cfg, splits.train, splits.image_size, rt, "training features")
    result = {"run": str(run_dir), "method": cfg.method, "precision": cfg.precision, "test_blur": test_blur}
    for name, dataset in (("val", splits.val), ("test", Blurred(splits.test, test_blur))):
        features, labels = clean_features(backbone, cfg, dataset, splits.image_size, rt, f"{name} features")
        correct = knn_predict(bank, bank_labels, features, k=k) == labels
        result[f"knn_{name}"] = round(100 * correct.float().mean().item(), 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--data-root", help="where the run's data set lies now (its data.root)")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--test-blur", type=float, default=0.0, metavar="SIGMA")
    args = parser.parse_args()
    for run_dir in args.runs:
        print(json.dumps(knn_val_test(run_dir, args.data_root, args.k, args.test_blur)), flush=True)


if __name__ == "__main__":
    main()
