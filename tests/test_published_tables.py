"""The README's and RESULTS.md's tables of real runs, recomputed from the run files they cite.

Each row names its seeds; its figures must be the mean and the sample std (n - 1) over those
seeds' ``results.json`` (``posthoc_la`` for a post-hoc row), to the one decimal shown.

Guards against: a figure typed by hand that no run gave (or a run file changed after the table);
a seed left out of a mean or a seed named that has no run; the population std (n) where the
tables say sample std; a post-hoc row filled from the plain classifier, or the reverse.
"""

import json
import re
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
TINY = RESULTS / "tinyimagenet-lt-r100-30e"
CIFAR = RESULTS / "cifar10-lt-r100-30e"
INET = RESULTS / "imagenette-lt-r100-30e"

# (document, the heading the table follows, {row label prefix: (run folder, post-hoc row?)})
TABLES = [
    ("README.md", "## Does it beat what practitioners use?", {
        "ce + post-hoc": (TINY / "method-ce", True), "ce-la": (TINY / "method-ce-la", False),
        "crt": (TINY / "method-crt", False), "ce (plain": (TINY / "method-ce", False),
        "dscl": (TINY / "method-dscl", False), "scl (bf16)": (TINY / "bf16/method-scl", False),
        "dscl + pbsd (bf16)": (TINY / "bf16/method-dscl-pbsd", False)}),
    ("docs/RESULTS.md", "**Measured so far: seeds 0 and 1", {
        "ce (end to end)": (TINY / "method-ce", False), "ce + post-hoc": (TINY / "method-ce", True),
        "crt": (TINY / "method-crt", False), "ce-la": (TINY / "method-ce-la", False),
        "dscl (alpha 0.3": (TINY / "method-dscl", False), "dscl (bf16": (TINY / "bf16/method-dscl", False),
        "crt, logit-adjusted": (TINY / "method-crt_linear.rebalance-loss", False),
        "dscl, logit-adjusted": (TINY / "method-dscl_linear.rebalance-loss", False),
        "scl (bf16": (TINY / "bf16/method-scl", False),
        "scl, logit-adjusted": (TINY / "bf16/method-scl_linear.rebalance-loss", False),
        "dscl + pbsd (alpha 0.3, bf16": (TINY / "bf16/method-dscl-pbsd", False),
        "dscl + pbsd, logit-adjusted": (TINY / "bf16/method-dscl-pbsd_linear.rebalance-loss", False)}),
    ("docs/RESULTS.md", "**The baselines practitioners use, seed 0**", {
        "ce + post-hoc": (CIFAR / "method-ce", True), "crt + post-hoc": (CIFAR / "method-crt", True),
        "crt": (CIFAR / "method-crt", False), "ce (end to end)": (CIFAR / "method-ce", False),
        "dscl+pbsd": (CIFAR / "method-dscl-pbsd_pretrain.alpha-0.3", False),
        "dscl+pbsd (alpha 0.3), rerun": (CIFAR / "method-dscl-pbsd_pretrain.alpha-0.3-rerun", False),
        "crt, logit-adjusted stage 2": (CIFAR / "method-crt_linear.rebalance-loss", False),
        "dscl+pbsd (alpha 0.3), rerun, logit-adjusted": (
            CIFAR / "method-dscl-pbsd_pretrain.alpha-0.3-rerun_linear.rebalance-loss", False)}),
    ("docs/RESULTS.md", "## Imagenette-LT, ratio 100, 128 px", {
        "ce + post-hoc": (INET / "method-ce", True), "ce (end to end)": (INET / "method-ce", False),
        "dscl + pbsd + post-hoc": (INET / "method-dscl-pbsd", True), "dscl + pbsd": (INET / "method-dscl-pbsd", False),
        "dscl + post-hoc": (INET / "method-dscl", True), "dscl": (INET / "method-dscl", False)}),
    ("docs/RECIPES.md", "### Strong stage-1 augmentation", {
        "dscl, MoCo v2": (CIFAR / "strong-augment/pretrain.strong_augment-none", False),
        "dscl, key view + RandAugment": (
            CIFAR / "strong-augment/pretrain.strong_augment-randaugment_pretrain.random_erasing-0.5", False)}),
    ("README.md", "## CIFAR-10-LT at a CPU budget", {
        "ce + post-hoc": (CIFAR / "method-ce", True), "crt": (CIFAR / "method-crt", False),
        "ce (end to end)": (CIFAR / "method-ce", False), "scl+pbsd": (CIFAR / "method-scl-pbsd", False),
        "scl": (CIFAR / "method-scl", False),
        "dscl+pbsd, paper's alpha 0.1": (CIFAR / "method-dscl-pbsd", False),
        "dscl, paper's alpha 0.1": (CIFAR / "method-dscl", False),
        "dscl+pbsd": (CIFAR / "method-dscl-pbsd_pretrain.alpha-0.3", False),
        "dscl": (CIFAR / "method-dscl_pretrain.alpha-0.3", False)}),
]
COLUMNS = {"Many": "many", "Medium": "medium", "Few": "few", "Overall": "overall", "val": "val_top1"}


def table_after(document: str, heading: str, first: str = "method") -> list[dict]:
    """The first Markdown table after ``heading`` whose first column is ``first``, as {column: cell} rows."""
    text = (ROOT / document).read_text(encoding="utf-8")
    assert heading in text, f"{document}: no '{heading}'"
    lines = text[text.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return rows


def run_figures(folder: Path, seed: int, posthoc: bool) -> dict:
    results = json.loads((folder / f"seed{seed}" / "results.json").read_text())
    if not posthoc:
        return results
    adjusted = results.get("posthoc_la")
    if adjusted is None:  # a run from before results.json held it: dscl evaluate --logit-adjust wrote it
        adjusted = json.loads((folder / f"seed{seed}" / "evaluations" / "posthoc-la.json").read_text())
    return adjusted


def parse_cell(cell: str) -> tuple[float, float | None]:
    match = re.fullmatch(r"\**(-?[\d.]+)(?: ± ([\d.]+))?\**", cell)
    assert match, f"not a figure: {cell!r}"
    return float(match[1]), None if match[2] is None else float(match[2])


@pytest.mark.parametrize("document,heading,rows", TABLES, ids=[f"{d}: {h}" for d, h, _ in TABLES])
def test_published_table_recomputes_from_its_run_files(document, heading, rows):
    table = table_after(document, heading)
    checked = set()
    for row in table:
        label = row["method"]
        matches = [prefix for prefix in rows if label.startswith(prefix)]
        if not matches or "not measured" in row.get("seeds", "") + row.get("Many", ""):
            continue
        folder, posthoc = rows[max(matches, key=len)]
        seeds = [int(s) for s in row["seeds"].split(",")]
        figures = [run_figures(folder, seed, posthoc) for seed in seeds]
        for column, cell in row.items():
            key = COLUMNS.get(column.split(" (")[0])  # "Few (2)": the Few column of 2 classes
            if key is None:
                continue
            shown_mean, shown_std = parse_cell(cell)
            values = [f[key] for f in figures]
            mean = statistics.fmean(values)
            assert abs(mean - shown_mean) <= 0.05 + 1e-9, f"{document} '{label}' {column}: {shown_mean} against {mean}"
            if len(values) > 1:
                assert shown_std is not None, f"{document} '{label}' {column}: no std over {len(values)} seeds"
                std = statistics.stdev(values)
                assert abs(std - shown_std) <= 0.05 + 1e-9, f"{document} '{label}' {column}: ±{shown_std} against {std}"
            else:
                assert shown_std is None, f"{document} '{label}' {column}: a std over one seed"
        checked.add(max(matches, key=len))
    assert checked == set(rows), f"{document}: rows not found in the table: {set(rows) - checked}"


# RESULTS.md's stage-2 comparison: each row's two run folders, class-balanced sampling and the
# logit-adjusted loss on the same stage 1 (seed 0)
STAGE2 = {
    "Tiny-ImageNet-LT crt": (TINY / "method-crt", TINY / "method-crt_linear.rebalance-loss"),
    "Tiny-ImageNet-LT dscl": (TINY / "method-dscl", TINY / "method-dscl_linear.rebalance-loss"),
    "CIFAR-10-LT crt": (CIFAR / "method-crt", CIFAR / "method-crt_linear.rebalance-loss"),
    "CIFAR-10-LT dscl+pbsd": (CIFAR / "method-dscl-pbsd_pretrain.alpha-0.3-rerun",
                              CIFAR / "method-dscl-pbsd_pretrain.alpha-0.3-rerun_linear.rebalance-loss"),
}


def test_stage2_comparison_recomputes_from_its_run_files():
    seen = set()
    for row in table_after("docs/RESULTS.md", "## Stage 2: class-balanced sampling or the logit-adjusted loss", "run"):
        name = next(n for n in STAGE2 if row["run"].startswith(n))
        runs = dict(zip(("sampler", "loss"), (run_figures(folder, 0, False) for folder in STAGE2[name])))
        for column, cell in row.items():
            if column == "run" or cell == "-":
                continue
            metric, variant = column.split(", ")
            key = {"val": "val_top1", "test": "overall", "Few": "few"}[metric]
            assert parse_cell(cell)[0] == pytest.approx(runs[variant][key], abs=0.005 + 1e-9), f"{name} {column}"
        seen.add(name)
    assert seen == set(STAGE2)


# RESULTS.md's Tiny-ImageNet-LT test split under blurs (benchmarks/sharpness_shift.py on the
# shipped seed-0 weights): row label -> (weights name, figure, the run folder of its val column)
SHARPNESS = {
    "ce": ("tinyimagenet-lt-r100/ce", "overall", (TINY / "method-ce", False)),
    "ce + post-hoc logit adjustment": ("tinyimagenet-lt-r100/ce", "posthoc_la", (TINY / "method-ce", True)),
    "ce-la": ("tinyimagenet-lt-r100/ce-la", "overall", (TINY / "method-ce-la", False)),
    "crt": ("tinyimagenet-lt-r100/crt", "overall", (TINY / "method-crt", False)),
    "dscl": ("tinyimagenet-lt-r100/dscl", "overall", (TINY / "method-dscl", False)),
    "dscl + pbsd": ("tinyimagenet-lt-r100/dscl-pbsd", "overall", (TINY / "bf16/method-dscl-pbsd", False)),
}


def test_sharpness_table_recomputes_from_its_output():
    lines = (TINY / "sharpness-shift" / "blur-curve.jsonl").read_text().splitlines()
    measured = {(row["run"], row["sigma"]): row for row in map(json.loads, lines) if "run" in row}
    seen = set()
    for row in table_after("docs/RESULTS.md", "**The test split is sharper than the training images", "seed 0"):
        name = row["seed 0"].split(" (")[0]
        weights, figure, val_run = SHARPNESS[name]
        for column, cell in row.items():
            if column == "seed 0" or not cell:
                continue
            if column == "val":
                expected = run_figures(val_run[0], 0, val_run[1])["val_top1"]
            else:
                sigma = 0.0 if column == "test as it is" else float(column.split()[1])
                expected = measured[weights, sigma][figure]
            assert abs(parse_cell(cell)[0] - expected) <= 0.05 + 1e-9, f"{name}, {column}: {cell} against {expected}"
        seen.add(name)
    assert seen == set(SHARPNESS)
