"""``dscl sweep``: every combination of a grid of config values, times every seed, one run after
another (or ``--jobs N`` at once), then a summary table and a per-class plot.

Each run lives in ``OUT/<combination>/seed<k>/``, an ordinary run folder. A call skips the runs
that finished (``results.json``), resumes the ones that were killed, and records a run that
stopped on an error (``error.txt``; not retried). Several sweep processes may share one OUT:
a lock file per run keeps them on different runs, and ``--jobs N`` starts N such processes.
Summaries are rebuilt from what is on disk, so they can always be regenerated with ``--summary-only``.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from .config import config_from_dict, flatten_config, load_config, parse_override
from .files import atomic_write_text, write_csv
from .engine.checkpoint import load_checkpoint
from .engine.rundir import RunDir
from .errors import ArgumentError, CheckpointError, ConfigError, DSCLError
from .methods import REGISTRY
from .weights import run_folder

METRICS = ("overall", "many", "medium", "few", "val_top1", "train_s")


@dataclass
class Combination:
    settings: tuple[str, ...]  # ("key=value", ...), in grid order
    label: str | None = None  # a layout's row name; None: the settings are the name
    paper: float | None = None  # the paper's overall top-1 for a layout row, where it gives one

    @property
    def name(self) -> str:
        return self.label or ",".join(self.settings) or "base"

    @property
    def folder(self) -> str:
        slug = "_".join(s.replace("=", "-") for s in self.settings) or "base"
        return "".join(c if c.isalnum() or c in "-_.," else "-" for c in slug)


def parse_grid(grid: list[str]) -> list[tuple[str, list[str]]]:
    """``["key=v1,v2", ...]`` -> [(key, [v1, v2]), ...]; a list value keeps its brackets: ``k=[1,2],[3]``."""
    axes = []
    for text in grid:
        key, values = parse_override(text)[0], text.split("=", 1)[1]
        items, depth, current = [], 0, ""
        for ch in values:
            depth += ch == "["
            depth -= ch == "]"
            if ch == "," and depth == 0:
                items.append(current)
                current = ""
            else:
                current += ch
        items.append(current)
        if not all(v.strip() for v in items):
            raise ConfigError(f"--grid {text!r}: an empty value")
        axes.append((".".join(key), [v.strip() for v in items]))
    names = [k for k, _ in axes]
    if len(set(names)) != len(names):
        raise ConfigError(f"--grid: a key is given twice ({', '.join(names)})")
    return axes


def combinations(axes: list[tuple[str, list[str]]], layout: str | None = None) -> list[Combination]:
    """The grid's combinations; with a layout, each of its rows crossed with them."""
    grid = [tuple(f"{k}={v}" for k, v in zip([k for k, _ in axes], values))
            for values in itertools.product(*[v for _, v in axes])]
    if layout is None:
        return [Combination(settings) for settings in grid]
    if layout not in LAYOUTS:
        raise ConfigError(f"--layout {layout!r}: unknown; known: {', '.join(LAYOUTS)}")
    return [Combination(row + settings, label + (f" ({','.join(settings)})" if settings else ""), paper)
            for settings in grid for label, row, paper in LAYOUTS[layout]]


# The paper's tables as rows of settings over a recipe (its method key is overridden per row),
# with the overall top-1 the paper reports (ImageNet-LT, ResNet-50).
LAYOUTS = {
    "table1": [  # paper Table 1: components
        ("SCL (baseline)", ("method=scl",), 51.2),
        ("DSCL", ("method=dscl",), 52.6),
        ("SCL + PBSD", ("method=scl+pbsd",), 56.3),
        ("DSCL + PBSD* (global-view teacher)", ("method=dscl+pbsd", "pretrain.pbsd_teacher=global"), 56.2),
        ("DSCL + PBSD† (multi-crop instead)", ("method=dscl+pbsd", "pretrain.patch_mode=multicrop"), 56.1),
        ("DSCL + PBSD", ("method=dscl+pbsd",), 57.7),
    ],
    "table3s": [  # supplement Table 3: a balanced queue and re-weighting, on the full method
        ("DSCL + PBSD", ("method=dscl+pbsd",), None),
        ("+ class-balanced queue", ("method=dscl+pbsd", "pretrain.queue_sampling=balanced"), None),
        ("+ effective-number re-weighting", ("method=dscl+pbsd", "pretrain.reweight=effective_number"), None),
    ],
}

# Points of the paper's Fig. 5 that its text states (ImageNet-LT overall top-1), by config key.
PAPER_CURVES = {
    "pretrain.alpha": {0.0: 56.8, 0.1: 57.7, 1.0: 39.8},
    "pretrain.num_patches": {1: 55.0, 5: 57.7},
    "pretrain.pbsd_weight": {1.5: 57.7},
}


def sweep(config: Path | None, overrides: list[str], grid: list[str], seeds: list[int], out: Path, *,
          select: str | None = None, summary_only: bool = False, layout: str | None = None,
          posthoc: bool = False, jobs: int = 1, summary: bool = True) -> list[dict]:
    """Run every combination x seed (unless ``summary_only``) and write the summaries; with
    ``layout`` (a key of :data:`LAYOUTS`) the combinations are that table's rows; with ``posthoc``
    each is followed by its post-hoc logit-adjusted row. With ``jobs`` > 1 the runs are shared
    by that many worker processes (see :func:`run_workers`); ``summary=False`` (a worker's) only runs."""
    if jobs < 1:
        raise ArgumentError(f"sweep --jobs {jobs}: give 1 or more")
    axes = parse_grid(grid)
    combos = combinations(axes, layout)
    configs = {}
    for combo in combos:  # refuse a bad grid value, or a finished run of another config, before anything trains
        for seed in seeds:
            cfg = configs[combo.name, seed] = load_config(config, [*overrides, *combo.settings, f"seed={seed}"])
            if _finished(path := out / combo.folder / f"seed{seed}"):  # reused as is, so it must be this run
                _check_same(path, cfg.to_dict())
    if not summary_only:
        todo = [(c, s) for s in seeds for c in combos if not _finished(out / c.folder / f"seed{s}")]
        print(f"sweep: {len(combos)} combination(s) x {len(seeds)} seed(s); {len(todo)} run(s) to do", flush=True)
        if jobs > 1 and len(todo) > 1:
            run_workers(worker_command(config, overrides, grid, seeds, out, layout), min(jobs, len(todo)))
        else:
            _run_all(todo, configs, out)
    if not summary:
        return []
    # from the run folders alone, so the same runs give the same summary however many processes ran them
    rows = summarise(out, combos, seeds, select, layout, posthoc)
    if layout is None and len(axes) == 1 and len(axes[0][1]) > 1:
        _write_curve(out, axes[0][0], axes[0][1], rows)
    return rows


def _run_all(todo: list[tuple[Combination, int]], configs: dict, out: Path) -> None:
    """The runs, one after another, in this process; those another process holds are left to it."""
    from .analysis.plots import plot_finished_run
    from .engine import run, setup, teardown

    for n, (combo, seed) in enumerate(todo, 1):
        cfg, path = configs[combo.name, seed], out / combo.folder / f"seed{seed}"
        with RunLock(path) as mine:
            if not mine or _finished(path):  # another sweep process has it, or finished it
                continue
            print(f"\n=== sweep run {n}/{len(todo)}: {combo.name}, seed {seed} -> {path}", flush=True)
            _check_same(path, cfg.to_dict())
            # a sibling's stage 1 that another worker is still training is not there yet: this run trains its own
            _reuse_stage1(path, cfg.to_dict(), sorted(out.glob(f"*/seed{seed}")))
            rt = setup(cfg.device)
            try:
                if run(cfg, path, rt, resume=(path / "config.yaml").is_file()) is not None:
                    plot_finished_run(path)
            except DSCLError as exc:
                if isinstance(exc, ConfigError):
                    raise
                atomic_write_text(path / "error.txt", f"{exc}\n")
                print(f"sweep: run failed, recorded in {path / 'error.txt'}: {exc}", flush=True)
            finally:
                teardown()


def worker_command(config: Path | None, overrides: list[str], grid: list[str], seeds: list[int], out: Path,
                   layout: str | None) -> list[str]:
    """``dscl sweep`` of the same runs, one at a time and without the summary: one worker of ``--jobs``."""
    return [sys.executable, "-m", "dscl", "sweep", *(["--config", str(config)] if config else []),
            *[x for o in overrides for x in ("--set", o)], *[x for g in grid for x in ("--grid", g)],
            "--seeds", *map(str, seeds), "--out", str(out), *(["--layout", layout] if layout else []),
            "--jobs", "1", "--no-summary"]


def threads_per_job(jobs: int) -> int:
    """The CPU threads of one of ``jobs`` workers: OMP_NUM_THREADS (where the user set it: the
    total to share) or the cores this process may use, split evenly, at least one each."""
    given = os.environ.get("OMP_NUM_THREADS", "")
    if given.isdigit():
        total = int(given)
    else:
        total = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, total // jobs)


def run_workers(command: list[str], jobs: int) -> None:
    """``jobs`` copies of ``command`` at once, each with its share of the threads (on a GPU machine
    all of them share the GPU); their run locks keep them on different runs. Returns when all
    have ended; a worker that exited with an error is named in a :class:`DSCLError`."""
    threads = threads_per_job(jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    print(f"sweep: {jobs} worker processes, {threads} thread(s) each", flush=True)
    workers = []
    try:
        for _ in range(jobs):
            workers.append(subprocess.Popen(command, env=env))
        codes = [w.wait() for w in workers]
    finally:  # interrupted: stop the workers too; their runs resume on the next call
        for w in workers:
            if w.poll() is None:
                w.terminate()
                w.wait()
    failed = [f"worker {k} (pid {w.pid}) exited with status {code}"
              for k, (w, code) in enumerate(zip(workers, codes), 1) if code != 0]
    if failed:
        raise DSCLError("sweep: " + "; ".join(failed) + " (why: in the output above); the runs that finished "
                        "are kept and the same command resumes the others")


class RunLock:
    """``seed<k>.lock`` beside a run folder, holding the owner's pid: several sweep processes
    (one per core, say) can share one --out, each taking the runs no live process holds."""

    def __init__(self, path: Path):
        self.file = path.parent / f"{path.name}.lock"
        self.held = False

    def __enter__(self) -> bool:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if _alive(self.file):
                    return False
                self.file.unlink(missing_ok=True)  # left by a process that died
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(str(os.getpid()))
            self.held = True
            return True
        return False

    def __exit__(self, *exc) -> None:
        if self.held:
            self.file.unlink(missing_ok=True)


def _alive(lock: Path) -> bool:
    try:
        pid = int(lock.read_text() or 0)
        os.kill(pid, 0)
    except (ValueError, OSError):
        return False
    return pid != os.getpid()


def _reuse_stage1(path: Path, config: dict, candidates: list[Path]) -> None:
    """A run whose stage 1 equals a finished one under the same --out (of this grid or of an
    earlier one) starts from that stage 1 instead of training it again (:func:`start_from_stage1`)."""
    if (path / "config.yaml").is_file():
        return
    mine = flatten_config(config)
    for other in candidates:
        saved = _saved_config(other)
        if other != path and saved is not None and (other / "checkpoints" / "pretrain.pt").is_file() \
                and not _stage1_differences(saved, mine):
            start_from_stage1(path, config, other)
            return


def start_from_stage1(path: Path, config: dict, source: str | Path) -> None:
    """Start the run of ``config`` in ``path`` (which holds no run) from the finished stage 1 of
    ``source``, a run folder or published weights (``dscl run --from``): refused unless ``config``
    trains the same stage 1, i.e. is equal apart from ``linear.*``, where the data and the device
    are, and the method's stage 2 (cRT's stage 1 is CE's). The log says where stage 1 came from."""
    source = run_folder(source)
    saved = _saved_config(source)
    if diffs := _stage1_differences(saved, flatten_config(config)):
        raise ConfigError(f"--from {source}: its stage 1 is not the one asked for:\n  " + "\n  ".join(diffs))
    state = load_checkpoint(source / "checkpoints" / "pretrain.pt")
    if state.get("stage") != "pretrain" or not state.get("complete"):
        raise CheckpointError(f"{source / 'checkpoints' / 'pretrain.pt'}: stage 1 did not finish")
    run_dir = RunDir(path)
    run_dir.prepare(config, resume=False)
    kept = {k: v for k, v in state.items() if k not in ("format", "config")}  # published weights: no metrics
    run_dir.save(run_dir.checkpoint("pretrain"), {"epochs": saved["pretrain.epochs"], "metrics": [], **kept})
    run_dir.log(f"stage 1 reused from {source} (the same stage 1: configuration equal apart from "
                f"linear.* and the method's stage 2)")


def _finished(path: Path) -> bool:
    return (path / "results.json").is_file() or (path / "error.txt").is_file()


def _saved_config(path: Path) -> dict | None:
    """A run folder's config, flat; keys added to dscl since it was written take their defaults."""
    saved = path / "config.yaml"
    if not saved.is_file():
        return None
    try:
        return flatten_config(config_from_dict(yaml.safe_load(saved.read_text()) or {}).to_dict())
    except (ConfigError, yaml.YAMLError) as exc:
        raise ConfigError(f"{saved}: {exc}") from None


def _comparable(flat: dict, *skip: str) -> dict:
    """The keys that make two runs different runs: not ``logging.*`` (what is recorded, not what
    is trained), nor the given prefixes, nor the keys the run's method never reads (the DSCL
    weight, the logit adjustment's tau)."""
    method = REGISTRY.get(str(flat.get("method")))
    if method is None or not method.decoupled:
        skip = (*skip, "pretrain.alpha", "pretrain.beta")
    if method is None or not method.logit_adjusted:
        skip = (*skip, "pretrain.la_tau")
    return {k: v for k, v in flat.items() if not k.startswith(("logging.", *skip))}


def _stage1_differences(saved: dict, flat: dict) -> list[str]:
    """``key: saved -> asked`` for what decides a run's stage 1: its config without ``linear.*``
    and the movable keys, the method named by the stage 1 it trains (cRT's is CE's)."""
    def stage1(config: dict) -> dict:
        method = REGISTRY.get(str(config.get("method")))
        return _comparable(config, "linear.", *MOVABLE) | {"method": method.stage1 if method else config.get("method")}

    return _differences(stage1(saved), stage1(flat))


# Keys a finished run may differ in and still be the same run: where the data and the device were.
MOVABLE = ("data.root", "data.num_workers", "device")


def _differences(saved: dict, current: dict) -> list[str]:
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in sorted(set(saved) | set(current))
            if saved.get(k) != current.get(k)]


def _check_same(path: Path, config: dict) -> None:
    """Refuse a folder holding a run of another configuration (where data and device are aside)."""
    saved = _saved_config(path)
    if saved is not None:
        if diffs := _differences(_comparable(saved, *MOVABLE), _comparable(flatten_config(config), *MOVABLE)):
            raise ConfigError(f"{path} holds a run of another configuration:\n  " + "\n  ".join(diffs)
                              + "\nuse another --out, or remove that folder")


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarise(out: Path, combos: list[Combination], seeds: list[int], select: str | None = None,
              layout: str | None = None, posthoc: bool = False) -> list[dict]:
    """summary.csv, summary.md and per_class.png (with a layout: ``<layout>.md`` / ``.csv``)
    from the run folders under ``out``; with ``posthoc``, each combination is followed by a row
    of the same classifiers with post-hoc logit adjustment."""
    rows, curves = [], []
    for combo in combos:
        results, failed, adjusted = [], [], []
        for seed in seeds:
            path = out / combo.folder / f"seed{seed}"
            if (path / "results.json").is_file():
                results.append(json.loads((path / "results.json").read_text()))
                results[-1].setdefault("train_s", _epoch_seconds(path))
                adjusted.append(posthoc_results(path, results[-1]))
            elif (path / "error.txt").is_file():
                failed.append(f"seed {seed}: {(path / 'error.txt').read_text().strip()}")
        row = _row(combo.name, results, len(failed))
        if layout is not None:
            row["paper_overall"] = combo.paper
        rows.append(row)
        adjusted = [a for a in adjusted if a is not None]
        if adjusted and posthoc:  # the same classifiers, post-hoc logit-adjusted (no training)
            rows.append(_row(f"{combo.name} + post-hoc LA", adjusted))
        if results:
            per_class = [mean_std([r["per_class"][c] for r in results])[0] for c in range(len(results[0]["per_class"]))]
            curves.append((combo.name, results[0]["train_counts"], per_class))
    if select == "val":
        scored = [r for r in rows if r["val_top1"] is not None]
        best = max(scored, key=lambda r: r["val_top1"], default=None)
        for r in rows:
            r["selected"] = r is best
    out.mkdir(parents=True, exist_ok=True)
    stem = layout or "summary"
    write_csv(out / f"{stem}.csv", rows, digits=3)
    atomic_write_text(out / f"{stem}.md", format_summary(rows, seeds, select) + "\n")
    if curves:
        from .analysis.figures import save_figure
        from .analysis.plots import per_class_figure

        save_figure(per_class_figure(curves), out / f"{'per_class' if layout is None else layout + '_per_class'}.png",
                    dpi=110)
    print("\n" + format_summary(rows, seeds, select), flush=True)
    return rows


def _row(name: str, results: list[dict], failed: int = 0) -> dict:
    """One summary row: mean and std over the runs' results of each of :data:`METRICS`."""
    row = {"combination": name, "runs": len(results), "failed": failed}
    for metric in METRICS:
        row[metric], row[f"{metric}_std"] = mean_std([r.get(metric) for r in results])
    return row


POSTHOC_FILE = "evaluations/posthoc-la.json"  # where ``dscl evaluate --logit-adjust`` puts it for older runs


def posthoc_results(path: Path, results: dict) -> dict | None:
    """A finished run's post-hoc logit adjustment: from its results.json, or for runs made
    before dscl computed it, from ``dscl evaluate RUN --logit-adjust``; None when neither has it."""
    if "posthoc_la" in results:
        return results["posthoc_la"]
    extra = path / POSTHOC_FILE
    return json.loads(extra.read_text()) if extra.is_file() else None


def _epoch_seconds(path: Path) -> float | None:
    """The summed epoch times in a run's metrics.csv (for results written before ``train_s``)."""
    try:
        rows = list(csv.DictReader((path / "metrics.csv").open()))
    except OSError:
        return None
    return sum(float(r["seconds"]) for r in rows if r.get("seconds")) or None


def _cell(mean, std, digits: int = 1) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_summary(rows: list[dict], seeds: list[int], select: str | None = None) -> str:
    """Markdown table: mean ± std over seeds (top-1 %), validation accuracy, and the training
    time (the epochs of both stages, summed over whichever processes ran them)."""
    paper = any("paper_overall" in r for r in rows)
    lines = [f"seeds {', '.join(map(str, seeds))}; mean ± sample std (n - 1) over the finished runs (a single run: "
             "its value); val: the validation split that chose the stage-2 epoch (optimistic)"
             + ("; * best validation accuracy" if select == "val" else "")
             + ("; paper: overall top-1 the paper reports on ImageNet-LT (ResNet-50)" if paper else ""), "",
             "| combination | runs | Many | Medium | Few | Overall | val | training time (s) |"
             + (" paper |" if paper else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if paper else "")]
    for r in rows:
        mark = " *" if r.get("selected") else ""
        runs = f"{r['runs']}" + (f" ({r['failed']} failed)" if r["failed"] else "")
        time_s = "-" if r["train_s"] is None else f"{r['train_s']:.0f}"
        lines.append(f"| {r['combination']}{mark} | {runs} | " + " | ".join(
            _cell(r[m], r[f"{m}_std"]) for m in ("many", "medium", "few", "overall", "val_top1")) + f" | {time_s} |"
            + (f" {_cell(r.get('paper_overall'), None)} |" if paper else ""))
    return "\n".join(lines)


def _write_curve(out: Path, key: str, values: list[str], rows: list[dict]) -> None:
    """curve.csv and curve.png: each metric (mean over seeds) against the grid's one numeric
    key, with the points of the paper's Fig. 5 where it states them. Skipped for a key whose
    values are not numbers."""
    try:
        xs = [float(v) for v in values]
    except ValueError:
        return
    columns = ("overall", "many", "medium", "few")
    write_csv(out / "curve.csv", [{key: x, **{c: r[c] for c in columns},
                                   **{f"{c}_std": r[f"{c}_std"] for c in columns}}
                                  for x, r in zip(xs, rows)], digits=3)
    from .analysis.figures import pyplot

    fig, ax = pyplot().subplots(figsize=(6, 4))
    for c in columns:
        points = [(x, r[c]) for x, r in zip(xs, rows) if r[c] is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=c if c != "overall" else "overall (ours)",
                    linewidth=2.5 if c == "overall" else 1)
    paper = PAPER_CURVES.get(key)
    if paper:
        ax.plot(list(paper), list(paper.values()), "k*", markersize=10, label="paper, ImageNet-LT overall")
    ax.set_xlabel(key)
    ax.set_ylabel("test top-1 (%)")
    _finish(fig, ax, out / "curve.png")


def _finish(fig, ax, path: Path) -> None:
    """Grid, legend, tight layout; then the PNG, written atomically."""
    from .analysis.figures import save_figure

    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


