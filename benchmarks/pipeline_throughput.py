"""Does the data pipeline keep up? One stage-1 epoch end to end against ``dscl bench``.

    python benchmarks/pipeline_throughput.py --name demo
    python benchmarks/pipeline_throughput.py --name cifar --root DIR/cifar10-jpeg [--pipeline pil]

For the chosen settings it times (1) ``dscl bench``: forward, backward, optimiser, EMA and queue
on generated tensors, no data at all; (2) one real epoch of ``dscl pretrain`` with data loading
and augmentation included (``images_per_s`` of metrics.csv, first epoch, warm-up included).
Prints both and their ratio as one JSON line.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path

from dscl.bench import bench
from dscl.config import load_config
from dscl.demo import DEMO_SETTINGS
from dscl.engine import run, setup
from dscl.allocator import keep_freed_memory


def settings(args) -> list[str]:
    if args.name == "demo":
        return [*DEMO_SETTINGS, "method=dscl+pbsd", "pretrain.epochs=1", f"data.pipeline={args.pipeline}"]
    return ["method=dscl+pbsd", "data.name=imagefolder", f"data.root={args.root}", "data.imbalance_ratio=100",
            "model.backbone=resnet32", "pretrain.epochs=1", "pretrain.batch_size=256", "pretrain.queue_size=4096",
            "pretrain.patch_size=16", "pretrain.warmup_epochs=0", f"data.pipeline={args.pipeline}",
            f"data.num_workers={args.workers}"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", choices=["demo", "cifar"], required=True)
    parser.add_argument("--root", type=Path, help="cifar10-jpeg folder (for --name cifar)")
    parser.add_argument("--pipeline", choices=["auto", "pil", "tensor"], default="auto")
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args(argv)
    keep_freed_memory()
    sets = settings(args)
    step = bench(None, [s for s in sets if not s.startswith(("data.root", "data.name", "data.imbalance"))]
                 + ["data.image_size=32"], steps=5, warmup=2, print_json=False)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, sets)
        run(cfg, Path(tmp) / "run", setup("cpu"), stages=("pretrain",))
        rows = list(csv.DictReader(open(Path(tmp) / "run" / "metrics.csv")))
    epoch = float(rows[0]["images_per_s"])
    print(json.dumps({"settings": args.name, "pipeline": args.pipeline, "batch_size": cfg.pretrain.batch_size,
                      "bench_images_per_s": step["images_per_s"], "epoch_images_per_s": epoch,
                      "ratio": round(epoch / step["images_per_s"], 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
