"""The prepared GPU check: ImageNet-size throughput and the full CIFAR-10-LT protocol (or another
recipe's runs, e.g. Imagenette-LT's).

    python benchmarks/gpu_check.py --out OUT [--data DIR_OR_TARBALL] [--recipe CONFIG] [--budget SECONDS]
                                   [--smoke] [--run METHOD[:KEY=VALUE...]] ... [--set KEY=VALUE] ...

Everything goes under OUT/<the GPU's name> (OUT/cpu without one).

1. ``env.json``: the GPU's name (nvidia-smi), torch, CUDA and cuDNN versions.
2. ``dscl bench`` on the ImageNet recipe (ResNet-50, 224 px, batch 256, K = 65,536, L = 5 patches
   of 64 px): the reference and the optimised DSCL + PBSD step in fp32 and bf16, then the
   optimised bf16 step with channels_last, without and with torch.compile. Each line also times
   the plain CE step of the same backbone, so ``measured_ratio`` stands beside ``flop_ratio``.
3. When ``--data`` (or ``--cifar``) names an image folder or its archive: ``--recipe``'s runs on
   it, by default the 200 + 40-epoch CIFAR-10-LT ratio-100 recipe
   (configs/...-200e_cifar10-lt-r100.yaml, data resident on the GPU) on the cifar10-jpeg folder,
   for every ``--run`` (default: ce, ce-la, scl, dscl, dscl+pbsd), all at once as separate
   processes on the one GPU, until the budget's deadline; a run still going then is stopped and
   reported with the epochs it finished. Each run with a validation split also gives the row of
   its classifier with post-hoc logit adjustment (tau chosen on validation): "ce + posthoc-la" is
   the strongest baseline of the Tiny-ImageNet-LT table. Imagenette-LT's evidence for PBSD on
   photographs, for one: ``--recipe configs/dscl-pbsd_resnet18_b128-cos-30e_imagenette-lt-r100.yaml
   --data imagenette2-224.tar.gz --set data.num_workers=2 --run ce --run dscl --run dscl+pbsd
   --run dscl:seed=1 --run dscl+pbsd:seed=1``.

Every figure is written under OUT as soon as it exists (bench.jsonl / bench.md, runs.jsonl /
runs.md, runs.tar.gz with the run folders less their checkpoints), so a check stopped at a time
limit still leaves what it finished. ``--smoke`` shrinks every size and budget so the same
script can be checked end to end on a CPU.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CIFAR_RECIPE = ROOT / "configs" / "dscl-pbsd_resnet32_b256-cos-200e_cifar10-lt-r100.yaml"
FIELDS = ("variant", "precision", "channels_last", "compile", "batch_size", "queue_size", "step_ms", "images_per_s",
          "ce_step_ms", "ce_images_per_s", "flop_ratio", "measured_ratio", "peak_mem_mb")
RUN_FIELDS = ("run", "status", "epochs_done", "wall_s", "pretrain_s_per_epoch", "many", "medium", "few", "overall",
              "val_top1")
DEFAULT_RUNS = ("ce", "ce-la", "scl", "dscl", "dscl+pbsd")


def bench_cases(smoke: bool) -> list[list[str]]:
    """(--set values, with "--reference" for the reference step) of each bench line, in order."""
    if smoke:  # the same code paths (a torchvision ResNet) at tiny sizes
        recipe = ["model.backbone=resnet18", "data.image_size=64", "pretrain.patch_size=32", "pretrain.batch_size=4",
                  "pretrain.queue_size=64", "pretrain.num_patches=2"]
    else:
        recipe = ["model.backbone=resnet50", "data.image_size=224", "pretrain.patch_size=64",
                  "pretrain.batch_size=256", "pretrain.queue_size=65536", "pretrain.num_patches=5"]
    recipe.append("method=dscl+pbsd")
    cases = [[*recipe, "precision=bf16", "channels_last=true"]]  # the headline line first
    cases += [[*recipe, f"precision={precision}", *(["--reference"] if reference else [])]
              for precision in ("bf16", "fp32") for reference in (False, True)]
    cases.append([*recipe, "precision=bf16", "channels_last=true", "compile=true"])
    return cases


def run_bench(case: list[str], out: Path, steps: int, warmup: int, timeout: float) -> None:
    sets = [x for c in case if c != "--reference" for x in ("--set", c)]
    cmd = [sys.executable, "-m", "dscl", "bench", *sets, "--steps", str(steps), "--warmup", str(warmup)]
    if "--reference" in case:
        cmd.append("--reference")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        result = json.loads(lines[-1]) if lines else {"error": " | ".join(proc.stderr.strip().splitlines()[-3:])}
    except subprocess.TimeoutExpired:
        result = {"error": f"timed out after {timeout:.0f} s"}
    result["command"] = " ".join(["dscl", *cmd[3:]])
    append_jsonl(out / "bench.jsonl", result)
    write_table(out / "bench.jsonl", out / "bench.md", ("device", *FIELDS))
    print(json.dumps(result), flush=True)


def append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def write_table(source: Path, target: Path, fields) -> None:
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    lines = ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(f, r.get("error", "") if f == fields[0] else "")) for f in fields)
                     + " |")
    target.write_text("\n".join(lines) + "\n")


def environment() -> dict:
    import torch

    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True) if shutil.which("nvidia-smi") else None
    env = {"nvidia_smi": smi.stdout.strip() if smi else "no nvidia-smi", "torch": torch.__version__,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "python": sys.version.split()[0]}
    return env


def device_folder(env: dict) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'; 'cpu' without a GPU."""
    name = env["gpu"] or "cpu"
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def data_folder(path: Path, scratch: Path) -> Path:
    """The image folder (the one holding ``train/``) of ``path``, a folder or its archive."""
    if path.is_dir():
        return path
    with tarfile.open(path) as tar:
        tar.extractall(scratch / "data", filter="data")
    return min((p.parent for p in (scratch / "data").rglob("train") if p.is_dir()), key=lambda p: len(p.parts))


def run_name(spec: str) -> tuple[str, list[str]]:
    """'dscl+pbsd:pretrain.alpha=0.3' -> ('dscl-pbsd_pretrain.alpha-0.3', ['method=dscl+pbsd', ...])."""
    method, *sets = spec.split(":")
    name = "_".join([method.replace("+", "-"), *(s.replace("=", "-") for s in sets)])
    return name, [f"method={method}", *sets]


def start_runs(specs, recipe: Path, root: Path, scratch: Path, common: list[str], smoke: bool) -> dict:
    # data.pipeline as the recipe says: auto takes the on-device path for CIFAR's 32-px images
    sets = [f"data.root={root}", "data.name=imagefolder", "checkpoint_every_steps=0", *common]
    if smoke:
        sets += ["pretrain.epochs=1", "pretrain.warmup_epochs=0", "pretrain.steps_per_epoch=2", "linear.epochs=1",
                 "linear.steps_per_epoch=2", "pretrain.batch_size=16", "linear.milestones=[]",
                 "data.imbalance_ratio=10", "data.val_per_class=2"]  # a small fake tree will do
    runs = {}
    for spec in specs:
        name, own = run_name(spec)
        folder = scratch / "runs" / name
        cmd = [sys.executable, "-m", "dscl", "run", "--config", str(recipe), "--out", str(folder),
               *[x for s in [*sets, *own] for x in ("--set", s)]]
        log = open(scratch / f"{name}.out", "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1" if smoke else "2"})
        runs[name] = {"proc": proc, "folder": folder, "tic": time.time(), "wall": None,
                      "command": " ".join(["dscl", *cmd[3:]]).replace(str(root), "DATA")
                      .replace(str(folder), f"runs/{name}").replace(str(ROOT) + "/", "")}
        print(f"started {name}", flush=True)
    return runs


def wait_runs(runs: dict, deadline: float) -> None:
    while any(r["wall"] is None for r in runs.values()):
        for name, r in runs.items():
            if r["wall"] is None and r["proc"].poll() is not None:
                r["wall"] = round(time.time() - r["tic"], 1)
                print(f"{name} ended (exit {r['proc'].returncode}) after {r['wall']} s", flush=True)
        if time.time() > deadline:
            for r in runs.values():
                if r["wall"] is None:
                    os.killpg(r["proc"].pid, signal.SIGKILL)
                    r["wall"] = round(time.time() - r["tic"], 1)
                    r["stopped"] = True
            break
        time.sleep(2)


def summarise_run(name: str, r: dict) -> list[dict]:
    """The run's row, and the row of its classifier with post-hoc logit adjustment when recorded."""
    folder = r["folder"]
    row = {"run": name, "wall_s": r["wall"], "command": r["command"],
           "status": "stopped at the deadline" if r.get("stopped") else f"exit {r['proc'].returncode}"}
    metrics = folder / "metrics.csv"
    if metrics.exists():
        with open(metrics) as fh:
            rows = [m for m in csv.DictReader(fh) if m.get("stage") == "pretrain"]
        row["epochs_done"] = len(rows)
        seconds = [float(m["seconds"]) for m in rows if m.get("seconds")]
        if seconds:
            row["pretrain_s_per_epoch"] = round(sum(seconds) / len(seconds), 2)
    results = folder / "results.json"
    if not results.exists():
        return [row]
    res = json.loads(results.read_text())
    row.update({k: res.get(k) for k in ("overall", "many", "medium", "few", "val_top1", "train_s")})
    adjusted = res.get("posthoc_la")
    if not adjusted:
        return [row]
    return [row, {**row, "run": f"{name} + posthoc-la (tau {adjusted['tau']:g})",
                  **{k: adjusted[k] for k in ("overall", "many", "medium", "few", "val_top1")}}]


def bench_phase(args, deadline: float) -> None:
    tic = time.time()
    cases = bench_cases(args.smoke)
    if args.bench_cases is not None:
        cases = [cases[int(i)] for i in args.bench_cases.split(",") if i]
    for case in cases:
        left = deadline - time.time()
        if left < 20:
            append_jsonl(args.out / "bench.jsonl", {"error": "skipped: bench budget spent", "command": " ".join(case)})
            continue
        run_bench(case, args.out, steps=1 if args.smoke else 10, warmup=1 if args.smoke else 3, timeout=left)
    print(f"bench done after {time.time() - tic:.0f} s", flush=True)


def runs_phase(args, deadline: float) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        root = data_folder(args.data, scratch)
        runs = start_runs(args.runs or DEFAULT_RUNS, args.recipe, root, scratch, args.set, args.smoke)
        wait_runs(runs, deadline)
        for name, r in runs.items():
            for row in summarise_run(name, r):
                append_jsonl(args.out / "runs.jsonl", row)
                print(json.dumps(row), flush=True)
        write_table(args.out / "runs.jsonl", args.out / "runs.md", RUN_FIELDS)
        with tarfile.open(args.out / "runs.tar.gz", "w:gz") as tar:
            for name, r in runs.items():
                tar.add(scratch / f"{name}.out", arcname=f"runs/{name}.out")
                if r["folder"].exists():
                    tar.add(r["folder"], arcname=f"runs/{name}",
                            filter=lambda info: None if "/checkpoints" in info.name else info)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", "--cifar", type=Path, help="the runs' image folder or its .tar.gz (cifar10-jpeg)")
    parser.add_argument("--recipe", type=Path, default=CIFAR_RECIPE, help="the runs' config (default: %(default)s)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and budgets, to check the script on a CPU")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for the whole check")
    parser.add_argument("--bench-budget", type=float, default=240.0, help="seconds for the bench lines")
    parser.add_argument("--runs-first", "--cifar-first", action="store_true",
                        help="the runs first, the bench lines in the last --bench-budget seconds")
    parser.add_argument("--bench-cases", help="comma-separated indices of the bench lines to run (default: all)")
    parser.add_argument("--run", action="append", dest="runs", metavar="METHOD[:KEY=VALUE...]",
                        help=f"a run of the recipe (repeatable); default: {', '.join(DEFAULT_RUNS)}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for every run (repeatable)")
    args = parser.parse_args(argv)
    tic = time.time()
    env = environment()
    args.out = args.out / device_folder(env)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "env.json").write_text(json.dumps(env, indent=1) + "\n")
    print(json.dumps(env), flush=True)
    if args.data and args.runs_first:
        runs_phase(args, deadline=tic + args.budget - args.bench_budget)
    bench_end = args.budget if args.runs_first or not args.data else min(args.bench_budget, args.budget - 60)
    bench_phase(args, deadline=tic + bench_end)
    if args.data and not args.runs_first:
        runs_phase(args, deadline=tic + args.budget - 15)
    print(f"gpu check done after {time.time() - tic:.0f} s; figures in {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
