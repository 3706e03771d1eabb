"""CIFAR-10-LT (imbalance 100) from an image folder: five methods, one identical CPU budget.

    python benchmarks/cifar10_lt.py --root DIR/cifar10-jpeg --out runs/bench-cifar10-lt

DIR/cifar10-jpeg holds train/<class>/*.jpg and test/<class>/*.jpg. The long-tailed training set
is built with the standard recipe (per-class shuffle with seed 0, first n_c kept, files in
sorted order): 12,406 images, 5,000 down to 50 per class; the per-class counts are checked
against the formula before anything trains. Every method gets the same backbone, epochs, batch,
schedule and stage-2 budget. CIFAR-10-LT has no validation split, so stage 2 keeps its last
epoch (no selection at all, and never on the test split, which is evaluated once).
A method whose results.json exists is not run again (a killed benchmark resumes where it was).
Writes summary.md and summary.json in --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from dscl.config import load_config
from dscl.data import build_splits, longtail_counts
from dscl.demo import format_table
from dscl.engine import run, setup
from dscl.engine.allocator import keep_freed_memory
from dscl.engine.checkpoint import write_json

METHODS = ("ce", "scl", "dscl", "scl+pbsd", "dscl+pbsd")


def budget(args) -> list[str]:
    return [
        "data.name=imagefolder", f"data.root={args.root}", "data.imbalance_ratio=100", "data.val_per_class=0",
        f"data.num_workers={args.workers}", f"data.pipeline={args.pipeline}", "model.backbone=resnet32",
        f"pretrain.epochs={args.epochs}", f"pretrain.batch_size={args.batch}", f"pretrain.lr={args.lr}",
        "pretrain.warmup_epochs=1", f"pretrain.queue_size={args.queue}", "pretrain.ema_momentum=0.99",
        "pretrain.patch_size=16", f"linear.epochs={args.linear_epochs}", "linear.batch_size=512", "linear.lr=2.0",
        f"linear.milestones=[{args.linear_epochs * 2 // 3}]", f"seed={args.seed}",
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="the cifar10-jpeg image folder")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-cifar10-lt"))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--epochs", type=int, default=6, help="stage-1 epochs for every method")
    parser.add_argument("--linear-epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.4, help="stage-1 lr for a batch of 256 (scaled)")
    parser.add_argument("--queue", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--pipeline", choices=["pil", "tensor"], default="tensor")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    keep_freed_memory()

    splits = build_splits("imagefolder", str(args.root), imbalance_ratio=100, seed=args.seed)
    expected = longtail_counts(5000, 10, 100)
    counts = splits.train_counts
    print(f"CIFAR-10-LT train counts {counts} (total {sum(counts)}), expected {expected}")
    if counts != expected:
        print("per-class counts differ from the formula; stopping", file=sys.stderr)
        return 1

    rt = setup("cpu")
    rows = []
    for method in args.methods:
        out = args.out / method.replace("+", "-")
        results_path = out / "results.json"
        if results_path.is_file():
            results = json.loads(results_path.read_text())
        else:
            cfg = load_config(None, [*budget(args), f"method={method}"])
            results = run(cfg, out, rt, resume=(out / "config.yaml").is_file())
        rows.append({k: results[k] for k in ("method", "many", "medium", "few", "overall", "wall_time_s")})
        write_summary(args, rows)
    print("\n" + format_table(rows))
    return 0


def write_summary(args, rows) -> None:
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    write_json(args.out / "summary.json", {"rows": rows, "budget": budget(args), "machine": machine,
                                           "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
    text = (f"CIFAR-10-LT (ratio 100, JPEG copy), ResNet-32, {args.epochs} stage-1 + {args.linear_epochs} stage-2 "
            f"epochs per method; top-1 % on the balanced test set.\n\n{format_table(rows)}\n\nbudget: "
            + " ".join(f"--set {b}" for b in budget(args)) + f"\nmachine: {machine}\n")
    (args.out / "summary.md").write_text(text)


if __name__ == "__main__":
    sys.exit(main())
