"""One prepared GPU check, meant to finish in under 8 minutes on one recent GPU.

    python benchmarks/gpu_check.py --out OUT [--cifar DIR_OR_TARBALL] [--smoke]

1. ``dscl bench`` for the CIFAR-size ResNet-32 recipe (32 px, batch 128, K = 4,096 and 65,536,
   16-px patches) and the ImageNet-size ResNet-50 recipe (224 px, batch 256, K = 65,536, L = 5
   patches of 64 px): reference and optimised DSCL + PBSD steps (each bench line also times the
   plain CE step), in fp32 and bf16.
2. A short CIFAR-10-LT (ratio 100) training run of dscl+pbsd with the data set resident on the
   GPU (``data.pipeline: tensor``), when ``--cifar`` names the cifar10-jpeg folder or archive.

Every figure is appended to OUT as soon as it exists (bench.jsonl, bench.md, the run folder),
so a run stopped at a time limit still leaves what it finished. ``--smoke`` shrinks every budget
so the same script can be checked end to end on a CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

FIELDS = ("device", "backbone", "variant", "precision", "batch_size", "queue_size", "step_ms", "images_per_s",
          "ce_step_ms", "ce_images_per_s", "flop_ratio", "measured_ratio", "peak_mem_mb")


def bench_cases(smoke: bool) -> list[list[str]]:
    cifar = ["model.backbone=resnet32", "data.image_size=32", "pretrain.patch_size=16"]
    imagenet = ["model.backbone=resnet50", "data.image_size=224", "pretrain.patch_size=64"]
    if smoke:  # same code paths, tiny sizes
        cifar += ["pretrain.batch_size=8", "pretrain.queue_size=256"]
        imagenet = ["model.backbone=resnet50", "data.image_size=64", "pretrain.patch_size=32",
                    "pretrain.batch_size=4", "pretrain.queue_size=512", "pretrain.num_patches=2"]
        sizes = [cifar, imagenet]
    else:
        sizes = [cifar + ["pretrain.batch_size=128", "pretrain.queue_size=4096"],
                 cifar + ["pretrain.batch_size=128", "pretrain.queue_size=65536"],
                 imagenet + ["pretrain.batch_size=256", "pretrain.queue_size=65536"]]
    cases = []
    for recipe in sizes:
        for precision in ("fp32", "bf16"):
            for reference in (False, True):
                cases.append([*recipe, f"precision={precision}", "method=dscl+pbsd"]
                             + (["--reference"] if reference else []))
    return cases


def run_bench(case: list[str], out: Path, steps: int, timeout: int) -> None:
    sets = [x for c in case if c != "--reference" for x in ("--set", c)]
    cmd = [sys.executable, "-m", "dscl", "bench", *sets, "--steps", str(steps), "--warmup", "2"]
    if "--reference" in case:
        cmd.append("--reference")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        result = json.loads(lines[-1]) if lines else {"error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
    except subprocess.TimeoutExpired:
        result = {"error": f"timed out after {timeout} s"}
    result["command"] = " ".join(["dscl", *cmd[3:]])
    with open(out / "bench.jsonl", "a") as fh:
        fh.write(json.dumps(result) + "\n")
    write_table(out)
    print(json.dumps(result), flush=True)


def write_table(out: Path) -> None:
    rows = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    lines = ["| " + " | ".join(FIELDS) + " |", "|" + "---|" * len(FIELDS)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(f, r.get("error", "")) if f == "device" else r.get(f, ""))
                                       for f in FIELDS) + " |")
    (out / "bench.md").write_text("\n".join(lines) + "\n")


def cifar_folder(path: Path, scratch: Path) -> Path:
    if path.is_dir():
        return path
    with tarfile.open(path) as tar:
        tar.extractall(scratch, filter="data")
    return next(p.parent.parent for p in scratch.rglob("train/airplane"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cifar", type=Path, help="cifar10-jpeg folder or .tar.gz")
    parser.add_argument("--smoke", action="store_true", help="tiny budgets, to check the script on a CPU")
    parser.add_argument("--train-epochs", type=int, default=30, help="stage-1 epochs of the CIFAR-10-LT run")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    tic = time.time()
    for case in bench_cases(args.smoke):
        run_bench(case, args.out, steps=1 if args.smoke else 10, timeout=300 if args.smoke else 90)
    print(f"bench done after {time.time() - tic:.0f} s", flush=True)
    if args.cifar:
        with tempfile.TemporaryDirectory() as scratch:
            root = cifar_folder(args.cifar, Path(scratch))
            epochs = 1 if args.smoke else args.train_epochs
            sets = ["method=dscl+pbsd", "data.name=imagefolder", f"data.root={root}", "data.imbalance_ratio=100",
                    "data.val_per_class=20", "data.pipeline=tensor", "model.backbone=resnet32",
                    f"pretrain.epochs={epochs}", "pretrain.batch_size=256", "pretrain.lr=0.1",
                    "pretrain.warmup_epochs=1", "pretrain.queue_size=4096", "pretrain.patch_size=16",
                    "pretrain.ema_momentum=0.99",
                    f"linear.epochs={1 if args.smoke else 10}", "linear.batch_size=512", "linear.lr=0.1",
                    "linear.milestones=[7]", "checkpoint_every_steps=0"]
            if args.smoke:
                sets += ["pretrain.steps_per_epoch=2", "linear.steps_per_epoch=2", "pretrain.batch_size=16"]
            cmd = [sys.executable, "-m", "dscl", "run", "--out", str(args.out / "cifar10-lt-dscl-pbsd"),
                   *[x for s in sets for x in ("--set", s)]]
            (args.out / "train_command.txt").write_text(" ".join(["dscl", *cmd[3:]]) + "\n")
            subprocess.run(cmd)
    print(f"gpu check done after {time.time() - tic:.0f} s; figures in {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
