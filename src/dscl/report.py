"""``dscl report``: one self-contained HTML page that compares finished runs.

Everything is inside the file: figures as base64 PNG ``data:`` URIs, the style inline, no
script and no link to fetch, so the page opens anywhere, offline, and can be mailed as is. It
holds the results table (Many / Medium / Few / Overall test top-1 and validation top-1 from
each ``results.json``), the configuration keys in which the runs differ, the per-class accuracy
and training curves of all runs overlaid, and any other PNG a run folder holds (such as the
``dscl analyze`` figures under ``<run>/analyses/``).
"""

from __future__ import annotations

import base64
import html
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .analysis.figures import figure_png
from .analysis.plots import curves_figure, per_class_figure, read_metrics, read_results
from .analysis.runs import run_path
from .config import flatten_config
from .files import atomic_write_text
from .errors import ConfigError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_EMBEDDED_BYTES = 8 * 2**20  # a larger PNG in a run folder is listed, not embedded
REGENERATED = {"per_class.png", "curves.png"}  # drawn again for all runs together
COLUMNS = [("many", "Many"), ("medium", "Medium"), ("few", "Few"), ("overall", "Overall"), ("val_top1", "val")]


@dataclass
class RunSummary:
    path: Path
    name: str
    config: dict
    results: dict | None
    metrics: list[dict]
    figures: list[Path] = field(default_factory=list)


def load_summary(path: str | Path) -> RunSummary:
    """What the page shows of one run folder (or of the published weights of that name); a folder
    without config.yaml is refused."""
    path = run_path(path, hint="give --out folders of `dscl run`")
    saved = path / "config.yaml"
    try:
        config = yaml.safe_load(saved.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{saved}: unreadable: {exc}") from None
    try:
        results = read_results(path)
    except ValueError as exc:
        raise ConfigError(f"{path / 'results.json'}: unreadable: {exc}") from None
    figures = sorted(p for p in [*path.glob("*.png"), *(path / "analyses").glob("*.png")] if p.name not in REGENERATED
                     or p.parent != path)
    return RunSummary(path, path.name, config, results, read_metrics(path), figures)


def _names(paths: list[Path]) -> list[str]:
    """The shortest trailing parts of each path that tell the runs apart."""
    parts = [p.resolve().parts for p in paths]
    for k in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


ABSENT = _Absent()  # a key a run's config.yaml does not have (written before the key existed)


def config_differences(runs: list[RunSummary]) -> list[tuple[str, list]]:
    """(key, one value per run) for every key whose value is not the same in all runs."""
    flats = [flatten_config(r.config) for r in runs]
    keys = list(dict.fromkeys(k for f in flats for k in f))
    return [(k, [f.get(k, ABSENT) for f in flats]) for k in keys if len({repr(f.get(k, ABSENT)) for f in flats}) > 1]


def _number(value) -> str:
    return "&ndash;" if value is None else f"{value:.2f}"


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def results_table(runs: list[RunSummary]) -> str:
    rows = []
    for r in runs:
        res = r.results or {}
        cells = [html.escape(r.name), html.escape(str(r.config.get("method", "?")))]
        cells += [_number(res.get(key)) for key, _ in COLUMNS]
        train_s = res.get("train_s")
        cells.append("&ndash;" if train_s is None else f"{train_s:.0f}")
        cells.append("" if r.results else "no results.json yet")
        rows.append(cells)
    return _table(["run", "method", *[label for _, label in COLUMNS], "training (s)", "note"], rows, "results")


STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; } td code { font-size: 0.95em; }
img { max-width: 100%; display: block; margin: 0.5em 0; } figcaption { font-size: 0.85em; color: #555; }
.note { color: #555; font-size: 0.9em; }
"""


def build_report(run_dirs: list[str | Path]) -> str:
    """The page as a string."""
    if not run_dirs:
        raise ConfigError("report: give at least one run folder")
    runs = [load_summary(p) for p in run_dirs]
    for run, name in zip(runs, _names([r.path for r in runs])):
        run.name = name
    parts = [f"<h1>dscl report: {len(runs)} run{'s' if len(runs) > 1 else ''}</h1>",
             f'<p class="note">Written {time.strftime("%Y-%m-%d %H:%M")}. Top-1 % on the test split; Many / '
             f"Medium / Few: classes with &gt; 100, 20&ndash;100, &lt; 20 training images; val: the validation "
             f"split the stage-2 epoch was chosen on.</p>",
             "<h2>Results</h2>", results_table(runs)]
    diffs = config_differences(runs)
    parts.append("<h2>Configuration differences</h2>")
    if len(runs) == 1:
        parts.append('<p class="note">One run: nothing to compare; its configuration:</p>')
        parts.append(_table(["key", "value"], [[f"<code>{html.escape(k)}</code>", html.escape(repr(v))]
                                               for k, v in flatten_config(runs[0].config).items()]))
    elif diffs:
        parts.append(_table(["key", *[html.escape(r.name) for r in runs]],
                            [[f"<code>{html.escape(k)}</code>", *[html.escape(repr(v)) for v in values]]
                             for k, values in diffs], "config"))
    else:
        parts.append('<p class="note">The runs share every configuration key.</p>')
    parts.append("<h2>Plots</h2>")
    colour = {id(r): f"C{n % 10}" for n, r in enumerate(runs)}  # a run keeps its colour in every plot
    with_results = [r for r in runs if r.results and r.results.get("per_class")]
    if with_results:
        figure = per_class_figure([(r.name, r.results["train_counts"], r.results["per_class"]) for r in with_results],
                                  [colour[id(r)] for r in with_results])
        parts.append(_figure(figure_png(figure, dpi=100),
                             "Per-class test top-1 against training images per class (Few / Medium / Many shaded)"))
    with_metrics = [r for r in runs if r.metrics]
    if with_metrics:
        figure = curves_figure([(r.name, r.metrics) for r in with_metrics], [colour[id(r)] for r in with_metrics])
        parts.append(_figure(figure_png(figure, dpi=90), "Training curves from metrics.csv"))
    if not with_results and not with_metrics:
        parts.append('<p class="note">No results.json or metrics.csv yet.</p>')
    extra = [(r, f) for r in runs for f in r.figures]
    if extra:
        parts.append("<h2>Other figures in the run folders</h2>")
        for run, file in extra:
            parts.append(_embedded_file(run, file))
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>dscl report</title>'
            f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")


def _figure(data: bytes, caption: str) -> str:
    return f"<figure>{_img(data, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _embedded_file(run: RunSummary, file: Path) -> str:
    label = f"{run.name}/{file.relative_to(run.path)}"
    data = file.read_bytes() if file.stat().st_size <= MAX_EMBEDDED_BYTES else b""
    if not data.startswith(PNG_SIGNATURE):
        why = "too large to embed" if file.stat().st_size > MAX_EMBEDDED_BYTES else "not a PNG file"
        return f'<p class="note">{html.escape(label)}: {why}</p>'
    return _figure(data, label)


def write_report(run_dirs: list[str | Path], out: str | Path = "report.html") -> Path:
    """Write the page to ``out`` (atomically) and return its path."""
    out = Path(out)
    atomic_write_text(out, build_report(run_dirs))
    return out
