"""Command-line interface:
``dscl run | pretrain | linear | evaluate | predict | export | demo | sweep | bench | analyze | report``.

Every training command takes ``--config FILE`` (a YAML recipe), repeated ``--set key=value``
overrides and ``--out DIR``. Errors the user can fix are printed as one message, no traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .allocator import keep_freed_memory
from .errors import ConfigError, DSCLError


def _training_args(parser: argparse.ArgumentParser, out_required: bool = True, stage1_from: bool = False) -> None:
    parser.add_argument("--config", type=Path, help="YAML recipe (see configs/); omitted keys keep their defaults")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key, e.g. --set pretrain.epochs=10 (repeatable)")
    parser.add_argument("--out", type=Path, help="output folder of the run" + (" (required)" if out_required else ""))
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    if stage1_from:
        parser.add_argument("--from", dest="stage1_from", metavar="RUN_OR_NAME",
                            help="start a new run in --out from the finished stage 1 of this run folder or published "
                                 "weights (its config.yaml unless --config; --set may change linear.*, data.root, the "
                                 "device, or the method to one with the same stage 1: ce -> crt)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration (recipe, the recipes it inherits from, --set) and exit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dscl",
                                     description="Decoupled contrastive learning for long-tailed recognition")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in [("run", "stage 1, stage 2 and evaluation"), ("pretrain", "stage 1 only"),
                       ("linear", "stage 2 on the stage-1 checkpoint in --out"),
                       ("evaluate", "evaluate a finished run: RUN_DIR on another split or data set (into "
                                    "RUN_DIR/evaluations/), or the run in --out on its test split again")]:
        _training_args(sub.add_parser(name, help=text, description=text), out_required=name != "evaluate",
                       stage1_from=name in ("run", "linear"))
    _reuse_args(sub)
    demo = sub.add_parser("demo", help="train ce, scl, dscl and dscl+pbsd on the embedded synthetic data and compare")
    demo.add_argument("--out", type=Path, default=None,
                      help="parent folder of the four runs (default runs/demo-<time>)")
    demo.add_argument("--methods", nargs="+", default=None, help="subset of methods to run")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    sweep = sub.add_parser("sweep", help="every combination of a grid of config values x seeds, with a summary",
                           description="Run every combination of the --grid values for every seed, one after "
                                       "another (or --jobs N at once), into OUT/<combination>/seed<k>/; finished "
                                       "runs are skipped and killed ones resumed. Writes summary.md, summary.csv "
                                       "and per_class.png.")
    sweep.add_argument("--config", type=Path, help="YAML recipe every run starts from")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one key for every run (repeatable)")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                       help="one axis of the grid (repeatable); e.g. --grid method=scl,dscl")
    sweep.add_argument("--seeds", type=int, nargs="+", default=[0])
    sweep.add_argument("--out", type=Path, required=True, help="parent folder of the runs and the summaries")
    sweep.add_argument("--select", choices=["val"], default=None,
                       help="mark the combination with the best mean validation accuracy")
    sweep.add_argument("--summary-only", action="store_true", help="rebuild the summaries from the runs on disk")
    sweep.add_argument("--posthoc-la", action="store_true",
                       help="add a row per combination: its classifiers with post-hoc logit adjustment (tau chosen "
                            "on validation; runs made before dscl recorded it need `dscl evaluate RUN --logit-adjust`)")
    sweep.add_argument("--layout", choices=["table1", "table3s"], default=None,
                       help="the rows of one of the paper's tables (table1: components; table3s: the supplement's "
                            "queue and re-weighting ablation), crossed with any --grid; writes <layout>.md / .csv")
    sweep.add_argument("--jobs", type=int, default=1, metavar="N",
                       help="N runs at once, in N processes sharing the CPU threads (OMP_NUM_THREADS, where set, "
                            "is the total) and the GPU; the summary is the same as one after another (default 1)")
    sweep.add_argument("--no-summary", action="store_true", help=argparse.SUPPRESS)  # a --jobs worker
    bench = sub.add_parser("bench", help="time one stage-1 training step on generated tensors; prints JSON")
    bench.add_argument("--config", type=Path)
    bench.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    bench.add_argument("--reference", action="store_true", help="time the straightforward reference implementation")
    bench.add_argument("--steps", type=int, default=5, help="timed steps (after warm-up)")
    bench.add_argument("--warmup", type=int, default=2)
    _analysis_args(sub)
    return parser


RUN_HELP = "a finished run folder, or the name of weights published with dscl (e.g. tinyimagenet-lt-r100/ce)"


def _reuse_args(sub) -> None:
    """``predict``, ``export`` and ``evaluate RUN_DIR``: use a finished run without writing into its files."""
    evaluate = sub.choices["evaluate"]
    evaluate.add_argument("run_dir", type=Path, nargs="?", metavar="RUN_DIR", help=RUN_HELP)
    evaluate.add_argument("--data", metavar="NAME|ROOT", help="another data set name or data root "
                          "(otherwise the run's); --set data.KEY=VALUE changes any other data setting")
    evaluate.add_argument("--split", choices=["test", "val", "train"], default="test")
    evaluate.add_argument("--results", type=Path, help="results file (default RUN_DIR/evaluations/<data>-<split>.json)")
    evaluate.add_argument("--logit-adjust", action="store_true",
                          help="post-hoc logit adjustment of the run's classifier: tau chosen on the validation "
                               "split (0 to 2 by 0.25), then the test split "
                               "(default RUN_DIR/evaluations/posthoc-la.json)")
    predict = sub.add_parser("predict", help="top classes and probabilities of image files with a finished run",
                             description="Top classes and probabilities of image files with a finished run. Exit "
                             "status: 0 when every input was predicted; 1 when any input was skipped (a missing "
                             "path, an unreadable image, a folder without images: each is named on stderr, the "
                             "others are still predicted); 2 on an error (e.g. an unusable run folder).")
    predict.add_argument("run_dir", type=Path, metavar="RUN_DIR", help=RUN_HELP)
    predict.add_argument("inputs", nargs="+", metavar="IMAGES_OR_FOLDER", help="image files and folders (recursive)")
    predict.add_argument("--topk", type=int, default=5)
    predict.add_argument("--format", choices=["table", "json", "csv"], default="table")
    predict.add_argument("--batch-size", type=int, default=64)
    predict.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    export = sub.add_parser("export",
                            help="a finished run's classifier as a torchvision state dict, TorchScript or ONNX")
    export.add_argument("run_dir", type=Path, metavar="RUN_DIR", help=RUN_HELP)
    export.add_argument("--format", choices=["torchvision", "torchscript", "onnx", "run"], required=True,
                        help="run: a slim run folder (the classifier's weights, config, model card, results) "
                             "that dscl.load, predict and evaluate read like the run")
    export.add_argument("--out", type=Path, required=True, metavar="FILE|DIR")
    export.add_argument("--data-root", metavar="PATH", help="--format run: the data.root the copy records")
    export.add_argument("--no-check", action="store_true", help="skip running the file in a fresh process")


def _reuse_command(args) -> int:
    if args.command == "predict":
        from .inference import predict_command

        return predict_command(args.run_dir, args.inputs, topk=args.topk, fmt=args.format,
                               batch_size=args.batch_size, device=args.device)
    if args.command == "export":
        from .engine.trained import load
        from .export import export, export_run

        if args.format == "run":
            print(export_run(args.run_dir, args.out, args.data_root))
        else:
            print(export(load(args.run_dir), args.format, args.out, check=not args.no_check))
        return 0
    if args.run_dir is None:
        raise ConfigError("evaluate: give a run folder, RUN_DIR (or --out DIR to redo the run's own evaluation)")
    if args.logit_adjust:
        from .inference import logit_adjust_run

        logit_adjust_run(args.run_dir, args.overrides, args.results)
        return 0
    from .inference import evaluate_run

    evaluate_run(args.run_dir, args.data, args.overrides, args.split, args.results)
    return 0


def _stage_command(args) -> None:
    import yaml

    from .config import load_config
    from .analysis.plots import plot_finished_run
    from .engine import STAGES, run, setup, teardown

    stages = {"run": STAGES, "pretrain": ("pretrain",), "linear": ("linear",), "evaluate": ("evaluate",)}[args.command]
    config, resume, source = args.config, args.resume, getattr(args, "stage1_from", None)
    if source is not None:
        from .weights import run_folder

        source = run_folder(source)
        config = source / "config.yaml" if config is None else config
    if args.out is None and not args.print_config:
        raise ConfigError(f"{args.command}: --out DIR is required (the run's folder)")
    if args.command in ("linear", "evaluate") and args.out is not None and source is None:  # continue stage 1 in --out
        saved = args.out / "config.yaml"
        if config is None and saved.is_file():
            config = saved
        resume = True
    cfg = load_config(config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return
    if source is not None:
        from .sweep import start_from_stage1

        if not (args.resume and (args.out / "config.yaml").is_file()):  # else: go on with the run --from began
            start_from_stage1(args.out, cfg.to_dict(), source)
        resume = True
    rt = setup(cfg.device)
    try:
        if run(cfg, args.out, rt, stages=stages, resume=resume) is not None:
            plot_finished_run(args.out)
    finally:
        teardown()


def _analysis_args(sub) -> None:
    """``dscl analyze gradients | retrieval | cam`` and ``dscl report`` (docs/ANALYSES.md)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", type=Path, help="PNG to write (default RUN_DIR/analyses/<analysis>.png)")
    common.add_argument("--data-root", type=Path, help="where the run's data are now (default: its data.root)")
    common.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    analyze = sub.add_parser("analyze", help="the paper's analyses of a finished run, as PNG figures",
                             description="The paper's analyses of a finished run, each written as a PNG.")
    kinds = analyze.add_subparsers(dest="analysis", required=True)
    text = ("per class, the gradient-norm ratio of the anchor's own key to its same-class positives under SCL "
            "and DSCL, against class size, with the theory 1/|P_i| and alpha/(1-alpha) (Fig. 2); numbers in .json")
    gradients = kinds.add_parser("gradients", parents=[common], help=text, description=text)
    gradients.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    gradients.add_argument("--checkpoint", type=Path,
                           help="a stage-1 checkpoint of this run (default checkpoints/pretrain.pt)")
    gradients.add_argument("--init", action="store_true", help="the run's initial weights instead of a checkpoint")
    gradients.add_argument("--alpha", type=float, help="DSCL's alpha (default the run's; 0.1 for an scl run)")
    gradients.add_argument("--batches", type=int, default=20, help="training batches measured (default 20)")
    gradients.add_argument("--fill-batches", type=int, help="batches that only fill an empty queue first "
                                                            "(default: enough to fill it once)")
    gradients.add_argument("--seed", type=int, default=0)
    text = ("the top-k training images for a patch (box) of one image, by the patch feature PBSD pools "
            "(ROI-align on the last feature map), each with the patch's response map (Fig. 1, 4)")
    retrieval = kinds.add_parser("retrieval", parents=[common], help=text, description=text)
    retrieval.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR", help="one row of the figure each")
    retrieval.add_argument("--image", type=Path, help="an image file (default: image --index of --split)")
    retrieval.add_argument("--index", type=int, default=0)
    retrieval.add_argument("--split", choices=["test", "val", "train"], default="test")
    retrieval.add_argument("--box", metavar="X1,Y1,X2,Y2", help="in pixels of the S x S network input "
                                                                "(default: drawn at random as PBSD draws patches)")
    retrieval.add_argument("--k", type=int, default=3, help="images retrieved (default 3)")
    retrieval.add_argument("--seed", type=int, default=0, help="seed of the random box")
    text = "class activation maps of the run's classifier (its fc weights on the last feature map)"
    cam = kinds.add_parser("cam", parents=[common], help=text, description=text)
    cam.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    cam.add_argument("--image", type=Path, action="append", default=[], help="an image file (repeatable; map of the "
                                                                              "predicted class)")
    cam.add_argument("--per-class", type=int, default=1, help="images of each class from --split (default 1)")
    cam.add_argument("--classes", nargs="+", help="class names or indices (default all)")
    cam.add_argument("--split", choices=["test", "val", "train"], default="test")
    cam.add_argument("--target", choices=["true", "predicted"], default="true", help="whose class map to show")
    text = "one self-contained HTML page comparing runs: results table, config differences, plots"
    report = sub.add_parser("report", help=text, description=text)
    report.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    report.add_argument("--out", type=Path, default=Path("report.html"), help="HTML file (default report.html)")


def _analysis_command(args) -> int:
    from .analysis.runs import parse_box
    from .errors import ArgumentError

    if args.command == "report":
        from .report import write_report

        print(write_report(args.run_dirs, args.out))
        return 0
    first = args.run_dirs[0] if args.analysis == "retrieval" else args.run_dir
    out = args.out or first / "analyses" / f"{args.analysis}.png"
    where = {"data_root": args.data_root, "device": args.device}
    if args.analysis == "gradients":
        from .analysis.gradients import analyze_gradients

        if args.init and args.checkpoint:
            raise ArgumentError("analyze gradients: give --checkpoint or --init, not both")
        analyze_gradients(args.run_dir, out, checkpoint=args.checkpoint, initial=args.init, alpha=args.alpha,
                          batches=args.batches, fill_batches=args.fill_batches, seed=args.seed, **where)
    elif args.analysis == "retrieval":
        from .analysis.retrieval import analyze_retrieval

        analyze_retrieval(args.run_dirs, out, image=args.image, index=args.index, split=args.split, k=args.k,
                          box=parse_box(args.box) if args.box else None, seed=args.seed, **where)
    else:
        from .analysis.cam import analyze_cam

        analyze_cam(args.run_dir, out, images=args.image, per_class=args.per_class, classes=args.classes,
                    split=args.split, target=args.target, **where)
    print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    try:
        if args.command in ("analyze", "report"):
            return _analysis_command(args)
        if args.command == "demo":
            from .demo import demo

            demo(args.out, args.methods, args.overrides)
        elif args.command == "sweep":
            from .sweep import sweep

            sweep(args.config, args.overrides, args.grid, args.seeds, args.out, select=args.select,
                  summary_only=args.summary_only, layout=args.layout, posthoc=args.posthoc_la,
                  jobs=args.jobs, summary=not args.no_summary)
        elif args.command == "bench":
            from .bench import bench

            bench(args.config, args.overrides, reference=args.reference, steps=args.steps, warmup=args.warmup)
        elif args.command in ("predict", "export") or (args.command == "evaluate" and args.out is None):
            return _reuse_command(args)
        else:
            _stage_command(args)
    except DSCLError as exc:
        print(f"dscl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dscl: interrupted; continue with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
