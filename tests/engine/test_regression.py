"""Behaviour pinned across refactors: tiny runs of every method on the synthetic set give the
results and the trained weights recorded in ``regression.json``.

The figures were recorded before the method registry replaced the ``method`` string tests
(and were identical, bit for bit on CPU, after it). A change that is meant to alter what a run
computes regenerates them: ``DSCL_REGENERATE=1 pytest tests/engine/test_regression.py``, and
says so in its commit.

Guards against: a refactor that silently changes a loss, a model, the views, the sampler order
or the stage-2 selection of any method (accuracies compared exactly, weights to TOLERANCE).
"""

import json
import os
from pathlib import Path

import pytest
import torch

from dscl.cli import main

from conftest import TINY

FIXTURE = Path(__file__).with_name("regression.json")
SHORT = ["pretrain.epochs=1", "linear.epochs=1", "data.pipeline=pil", "pretrain.knn_every=1"]
CASES = {
    "ce": ["method=ce"],
    "scl": ["method=scl"],
    "dscl": ["method=dscl"],
    "scl+pbsd": ["method=scl+pbsd"],
    "dscl+pbsd": ["method=dscl+pbsd"],
    "dscl+pbsd-global-multicrop": ["method=dscl+pbsd", "pretrain.pbsd_teacher=global"],
    "dscl+pbsd-multicrop": ["method=dscl+pbsd", "pretrain.patch_mode=multicrop"],
    "dscl-balanced-reweight": ["method=dscl", "pretrain.queue_sampling=balanced",
                               "pretrain.reweight=effective_number"],
    "dscl+pbsd-3-experts": ["method=dscl+pbsd", "model.experts=3"],
}
# Stage 1's weights agree to 1e-5 across CPUs; stage 2 standardises the features of a one-epoch
# encoder, whose small per-feature spreads magnify those float differences (2.7e-4 relative on
# the PBSD cases between two x86 machines, both runs otherwise identical), hence 1e-3 there.
TOLERANCE = {"pretrain": 1e-5, "linear_best": 1e-3}
KEYS = ("overall", "many", "medium", "few", "val_top1", "per_class", "stage2", "experts")


def _weights(path: Path) -> dict:
    """Sum and sum of squares of every floating tensor of each checkpoint of a run."""
    out = {}
    for name in ("pretrain", "linear_best"):
        file = path / "checkpoints" / f"{name}.pt"
        if file.is_file():
            state = torch.load(file, weights_only=False)
            tensors = [v for part in ("model", "fc", "norm") if part in state for v in state[part].values()
                       if torch.is_tensor(v) and v.is_floating_point()]
            out[name] = [float(sum(t.double().sum() for t in tensors)),
                         float(sum(t.double().square().sum() for t in tensors))]
    return out


def record(out: Path, overrides: list[str]) -> dict:
    sets = [x for o in [*TINY, *SHORT, *overrides] for x in ("--set", o)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the fixture's sums are of one thread: more threads sum in another order
    try:
        with pytest.MonkeyPatch.context() as patch:  # the plots take longer than the tiny run
            patch.setattr("dscl.analysis.plots.plot_finished_run", lambda path: None)
            assert main(["run", "--out", str(out), *sets]) == 0
    finally:
        torch.set_num_threads(threads)
    results = json.loads((out / "results.json").read_text())
    return {"results": {k: results.get(k) for k in KEYS}, "weights": _weights(out)}


@pytest.mark.parametrize("case", CASES)
def test_a_tiny_run_computes_what_it_computed_before(case, tmp_path):
    got = record(tmp_path / "run", CASES[case])
    if os.environ.get("DSCL_REGENERATE"):
        table = json.loads(FIXTURE.read_text()) if FIXTURE.is_file() else {}
        table[case] = got
        FIXTURE.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        pytest.skip("regenerated")
    want = json.loads(FIXTURE.read_text())[case]
    assert got["results"] == want["results"]
    assert got["weights"].keys() == want["weights"].keys()
    for name, values in want["weights"].items():
        assert got["weights"][name] == pytest.approx(values, rel=TOLERANCE[name]), name
