"""How much the kept stage-2 epoch depends on the validation split, measured on a finished run.

    python benchmarks/stage2_selection.py RUN [--data-root DIR] [--per-class 1 2 5 10 20]
                                          [--extra-val N] [--draws 200] [--smooth 5] [--json OUT.json]

Stage 2 of RUN is trained again on its stage-1 backbone, with the run's own config and seed (so
the same epochs as the run's stage 2: the script checks that every epoch's validation accuracy
matches the run's metrics.csv), and every epoch is evaluated on the validation and the test
split. Then the epoch is chosen again, on the whole validation split and on ``--draws`` random
subsets of k validation images per class for each k of ``--per-class``: by the best validation
accuracy (``linear.select: best``, the first of equal ones), by the best of a trailing moving
average over ``--smooth`` epochs, and the last epoch (``linear.select: last``). For each it
prints the test top-1 (overall and Few) of the chosen epoch, mean and sample std over the
draws. The best epoch on test is printed for reference only: it is never a choice.

``--extra-val N`` (image folders) widens the validation split the choices are made on by up to N
images per class that the run never saw: held out the way ``data.val_per_class`` holds out its own
(a superset of the run's split), less any image the run trained on. A class with no such image
left (CIFAR-LT's head class keeps all of its images) keeps only the run's own; where the classes
then differ in size, a choice uses the mean of the per-class accuracies, as the test split does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from dscl.analysis.plots import read_metrics
from dscl.config import load_config
from dscl.engine.distributed import Runtime
from dscl.engine.evaluate import accuracy_report
from dscl.engine.linear import backbone_from_stage1, clean_features, train_linear
from dscl.engine.rundir import RunDir
from dscl.engine.runner import load_data
from dscl.engine.trained import read_run, stage1_state


def unseen_validation(cfg, splits, per_class: int):
    """Up to ``per_class`` more validation images per class that the run (``cfg``, ``splits``)
    never trained on."""
    if not hasattr(splits.train, "paths"):
        raise SystemExit("--extra-val needs an image-folder data set (images with paths)")
    wider = load_data(load_config(base=cfg.to_dict(),
                                  overrides=[f"data.val_per_class={cfg.val_per_class + per_class}"]))
    seen = set(splits.train.paths) | set(splits.val.paths)
    return wider.val.subset([i for i, path in enumerate(wider.val.paths) if path not in seen])


def frozen_run(run_dir: Path, data_root: str | None, needs_stage2: bool = False):
    """A finished run with a validation split: (run, cfg, splits, CPU runtime, its stage-1
    encoder in eval mode); ``data_root``: where its data set lies on this machine."""
    run, cfg = read_run(run_dir)
    if data_root:
        cfg = load_config(run.path / "config.yaml", [f"data.root={data_root}"])
    if needs_stage2 and not cfg.method_spec.stage2:
        raise SystemExit(f"{run_dir}: method {cfg.method} has no stage 2")
    splits = load_data(cfg)
    if splits.val is None:
        raise SystemExit(f"{run_dir}: the run has no validation split (data.val_per_class)")
    rt = Runtime(0, 1, torch.device("cpu"))
    return run, cfg, splits, rt, backbone_from_stage1(cfg, stage1_state(run)).eval()


def epoch_accuracies(run_dir: Path, data_root: str | None, extra_val: int = 0) -> dict:
    """Stage 2 of the run trained again: per epoch, which validation images it gets right
    (E, N_val; the run's own split first, then any ``extra_val`` ones) and its test report; the
    run's own per-epoch validation accuracies beside them."""
    run, cfg, splits, rt, backbone = frozen_run(run_dir, data_root, needs_stage2=True)
    val = clean_features(backbone, cfg, splits.val, splits.image_size, rt, "validation features")
    own_size = len(val[1])
    if extra_val:
        more = clean_features(backbone, cfg, unseen_validation(cfg, splits, extra_val),
                              splits.image_size, rt, "extra validation features")
        val = torch.cat([val[0], more[0]]), torch.cat([val[1], more[1]])
    test = clean_features(backbone, cfg, splits.test, splits.image_size, rt, "test features")
    val_correct, test_reports = [], []

    def record(epoch: int, model) -> None:
        with torch.no_grad():
            val_correct.append(model.head(val[0]).argmax(1) == val[1])
            report = accuracy_report(model.head(test[0]).argmax(1), test[1], splits.train_counts)
        test_reports.append({k: report[k] for k in ("overall", "many", "medium", "few")})

    with tempfile.TemporaryDirectory() as scratch:
        again = RunDir(Path(scratch))
        again.prepare(cfg.to_dict(), resume=False)
        train_linear(cfg, splits, rt, again, backbone, resume=False, after_epoch=record)
    own = [row["val_top1"] for row in read_metrics(run.path) if row.get("stage") == "linear"]
    return {"val_correct": torch.stack(val_correct), "val_labels": val[1], "test": test_reports,
            "own_val": [float(v) for v in own], "own_size": own_size, "num_classes": splits.num_classes}


def trailing_mean(values: torch.Tensor, window: int) -> torch.Tensor:
    """(E,) -> (E,): the mean of each value and the ``window`` - 1 before it (fewer at the start)."""
    sums = torch.cumsum(values, 0)
    shifted = torch.cat([torch.zeros(window, dtype=sums.dtype), sums])[: len(values)]
    counts = torch.arange(1, len(values) + 1).clamp(max=window)
    return (sums - shifted) / counts


def val_accuracy(correct: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(E, n) right / wrong -> (E,): the accuracy, or the mean per-class accuracy where the classes
    of the (sub)set differ in size."""
    counts = torch.bincount(labels)
    present = torch.nonzero(counts).flatten()
    if (counts[present] == counts[present[0]]).all():
        return correct.double().mean(1)
    return torch.stack([correct[:, labels == c].double().mean(1) for c in present], 1).mean(1)


def choices(correct: torch.Tensor, labels: torch.Tensor, smooth: int) -> dict[str, int]:
    """0-based epochs chosen from the (E, n) right / wrong table of a validation (sub)set."""
    accuracy = val_accuracy(correct, labels)
    smoothed = trailing_mean(accuracy, smooth)
    return {"best": int(accuracy.argmax()), f"best of {smooth}-epoch mean": int(smoothed.argmax()),
            "last": len(accuracy) - 1}


def selection_table(records: dict, per_class: list[int], draws: int, smooth: int, seed: int = 0) -> list[dict]:
    """One row per (validation images per class, rule): test top-1 of the chosen epoch over the draws."""
    correct, labels, test = records["val_correct"], records["val_labels"], records["test"]
    by_class = [torch.nonzero(labels == c).flatten() for c in range(records["num_classes"])]
    full = max(len(i) for i in by_class)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for k in [*(k for k in per_class if k < full), full]:
        picked: dict[str, list[int]] = {}
        for _ in range(draws if k < full else 1):
            subset = torch.cat([i[torch.randperm(len(i), generator=generator)[:k]] for i in by_class])
            for rule, epoch in choices(correct[:, subset], labels[subset], smooth).items():
                picked.setdefault(rule, []).append(epoch)
        for rule, epochs in picked.items():
            rows.append({"per_class": k, "images": sum(min(k, len(i)) for i in by_class), "rule": rule,
                         "draws": len(epochs), "epoch": statistics.median(epochs) + 1,
                         **{f"{g}_{stat}": value for g in ("overall", "few")
                            for stat, value in _mean_std([test[e][g] for e in epochs]).items()}})
    oracle = max(range(len(test)), key=lambda e: test[e]["overall"])
    rows.append({"per_class": None, "images": 0, "rule": "best on test (reference only)", "draws": 1,
                 "epoch": oracle + 1, "overall_mean": test[oracle]["overall"], "overall_std": 0.0,
                 "few_mean": test[oracle]["few"], "few_std": 0.0})
    return rows


def _mean_std(values: list) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def markdown(rows: list[dict]) -> str:
    def cell(mean, std):
        return "-" if mean is None else f"{mean:.2f} ± {std:.2f}"

    lines = ["| val images per class (total) | rule | draws | median epoch | test top-1 | test Few |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        size = "-" if r["per_class"] is None else f"{r['per_class']} ({r['images']})"
        lines.append(f"| {size} | {r['rule']} | {r['draws']} | {r['epoch']:g} | "
                     f"{cell(r['overall_mean'], r['overall_std'])} | {cell(r['few_mean'], r['few_std'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished run folder with checkpoints/pretrain.pt")
    parser.add_argument("--data-root", help="data.root, where the run's own is not on this machine")
    parser.add_argument("--per-class", type=int, nargs="+", default=[1, 2, 5, 10, 20])
    parser.add_argument("--extra-val", type=int, default=0, metavar="N",
                        help="widen the validation split by up to N unseen images per class (image folders)")
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--smooth", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the rows and the per-epoch figures here")
    args = parser.parse_args(argv)
    records = epoch_accuracies(args.run, args.data_root, args.extra_val)
    again = [round(100.0 * float(c[: records["own_size"]].double().mean()), 4) for c in records["val_correct"]]
    matches = again == [round(v, 4) for v in records["own_val"]]
    print(f"stage 2 trained again: {len(again)} epochs; validation accuracy per epoch "
          + ("equals the run's metrics.csv" if matches else f"DIFFERS from the run's metrics.csv: {again} against "
             f"{records['own_val']}"))
    rows = selection_table(records, args.per_class, args.draws, args.smooth)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps({"run": str(args.run), "matches_run": matches, "val_top1": again,
                                         "test": records["test"], "rows": rows}, indent=1) + "\n")
    return 0 if matches else 1


if __name__ == "__main__":
    sys.exit(main())
