"""A whole run: data, stage 1, stage 2, evaluation, into one output folder."""

from __future__ import annotations

import time
from pathlib import Path

from ..config import Config
from ..data import DataSplits, build_splits
from ..models import ExpertClassifier
from .distributed import Runtime, barrier
from .evaluate import accuracy_report, posthoc_logit_adjustment, predict_logits
from .experts import expert_results
from .linear import backbone_from_stage1, train_linear
from .pretrain import pretrain
from .rundir import RunDir
from .trained import load_classifier, model_card, stage1_state, write_model_card
from .views import split_loader

STAGES = ("pretrain", "linear", "evaluate")


def load_data(cfg: Config) -> DataSplits:
    d = cfg.data
    # imbalance_ratio None (image folders, split files) keeps every training image; load_config has
    # already written CIFAR-LT's and the synthetic set's default of 100 into the config
    splits = build_splits(d.name, d.root, imbalance_ratio=d.imbalance_ratio, val_per_class=cfg.val_per_class,
                          download=d.download, seed=cfg.seed, skip_bad_images=d.skip_bad_images, profile=d.profile,
                          synthetic_options={"num_classes": d.synthetic_classes, "n_max": d.synthetic_n_max,
                                             "n_per_class_eval": d.synthetic_eval_per_class},
                          test_folder=d.test_folder)
    if d.image_size:
        splits.image_size = d.image_size
    return splits


def run(cfg: Config, out: str | Path, rt: Runtime, *, stages=STAGES, resume: bool = False) -> dict | None:
    """Run the given stages in order; returns the results (on rank 0) when ``evaluate`` ran."""
    run_dir = RunDir(out, rt.is_main)
    run_dir.check(cfg.to_dict(), resume)
    barrier()  # every rank has looked at --out before rank 0 writes into it
    run_dir.write_config()
    tic = time.perf_counter()
    splits = load_data(cfg)
    counts, run_dir.data = splits.train_counts, splits.signature  # checkpoints hold it: the data may move
    per_class = (", ".join(map(str, counts)) if len(counts) <= 20 else f"{max(counts)} to {min(counts)}")
    run_dir.log(f"data {cfg.data.name}: {len(splits.train)} train / "
                f"{len(splits.val) if splits.val is not None else 0} val / {len(splits.test)} test images, "
                f"{splits.num_classes} classes, training images per class {per_class}"
                + (f"\n  {splits.selection}" if splits.selection else ""))
    timings = {}
    state, retrained, selection = None, False, {}
    if "pretrain" in stages:
        t = time.perf_counter()
        state, retrained = pretrain(cfg, splits, rt, run_dir, resume)
        timings["pretrain_s"] = round(time.perf_counter() - t, 2)
    if "linear" not in stages and "evaluate" not in stages:
        return None
    if state is None:
        state = stage1_state(run_dir)
    barrier()
    if cfg.method_spec.stage2 and "linear" in stages:
        t = time.perf_counter()
        model, selection = train_linear(cfg, splits, rt, run_dir, backbone_from_stage1(cfg, state),
                                        resume and not retrained)
        timings["linear_s"] = round(time.perf_counter() - t, 2)
    else:  # ce / ce-la keep the classifier they trained end to end; otherwise stage 2's kept layer
        model, selection = load_classifier(cfg, run_dir, splits.num_classes, state)
        model.to(rt.device)
    write_model_card(run_dir, model_card(cfg, splits, selection))  # what reusing the classifier needs
    if "evaluate" not in stages or not rt.is_main:
        return None
    t = time.perf_counter()
    test = predict_logits(model, split_loader(cfg, splits.test, splits.image_size, rt.device), device=rt.device)
    preds, labels = test[0].argmax(1), test[1]
    val_top1 = adjusted = None
    if splits.val is not None:  # the final model's validation accuracy, for choices across runs
        val = predict_logits(model, split_loader(cfg, splits.val, splits.image_size, rt.device), device=rt.device,
                             desc="val")
        val_top1 = accuracy_report(val[0].argmax(1), val[1], splits.train_counts)["overall"]
        adjusted = posthoc_logit_adjustment(val, test, splits.train_counts)
    experts = None
    if isinstance(model, ExpertClassifier):  # each expert alone, with its own linear layer
        experts = expert_results(model, split_loader(cfg, splits.test, splits.image_size, rt.device),
                                 splits.train_counts, rt.device)
    timings["evaluate_s"] = round(time.perf_counter() - t, 2)
    report = accuracy_report(preds, labels, splits.train_counts)
    results = {"method": cfg.method, "overall": report["overall"], "many": report["many"],
               "medium": report["medium"], "few": report["few"], "val_top1": val_top1,
               "per_class": report["per_class"],
               "train_counts": splits.train_counts, "classes": splits.classes, "test_images": len(labels),
               "bad_images_skipped": len(splits.bad_files), "stage2": selection or None, "seconds": timings,
               "wall_time_s": round(time.perf_counter() - tic, 2),
               # every epoch of both stages, whichever process (a resume, a reused stage 1) ran it
               "train_s": round(sum(row.get("seconds", 0.0) for row in run_dir.metrics), 1)}
    if adjusted is not None:  # the same classifier with post-hoc logit adjustment, tau chosen on val
        results["posthoc_la"] = adjusted
        run_dir.log(f"post-hoc logit adjustment: tau {adjusted['tau']:g} (on validation), test top-1 "
                    f"{adjusted['overall']:.2f}% (few {_fmt(adjusted['few'])})")
    if experts is not None:
        results["experts"] = experts
        run_dir.log("test top-1 of each expert alone: " + ", ".join(f"{e['overall']:.2f}%" for e in experts))
    run_dir.write_results(results)
    run_dir.log(f"test top-1 {results['overall']:.2f}% (many {_fmt(results['many'])}, medium "
                f"{_fmt(results['medium'])}, few {_fmt(results['few'])}) -> {run_dir.path / 'results.json'}")
    return results


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"
