"""The long-tail baselines in the same pipeline: logit-adjusted CE end to end, cRT (stage 2 on
a CE backbone), stage 2 with the logit-adjusted loss on natural sampling, post-hoc adjustment."""

import json
import re
from pathlib import Path

import pytest
import torch

import dscl
from dscl.cli import main
from dscl.config import load_config
from dscl.data import NaturalSampler
from dscl.engine.pretrain import build_stage1_model, loss_priors, stage1_losses
from dscl.losses import log_prior, logit_adjusted_loss

from conftest import TINY

SRC = Path(dscl.__file__).parent


def _sets(overrides):
    return [x for o in overrides for x in ("--set", o)]


@pytest.fixture
def no_plots(monkeypatch):
    monkeypatch.setattr("dscl.analysis.plots.plot_finished_run", lambda path: None)


def test_no_method_name_is_tested_outside_the_registry():
    """Guards against: a new branch on the method's name (the traits in dscl.methods say what a
    method does)."""
    pattern = re.compile(r"""method\s*(==|!=)\s*["']|method\.(startswith|endswith)\(|method\s+in\s+\(""")
    offenders = [f"{p.relative_to(SRC)}:{n}" for p in SRC.rglob("*.py") if p.name != "methods.py"
                 for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def test_ce_la_trains_on_the_logit_adjusted_loss():
    cfg = load_config(None, [*TINY, "method=ce-la", "pretrain.la_tau=0.5"])
    counts = [60, 20, 6]
    model = build_stage1_model(cfg, 3)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 2])
    log_pi = loss_priors(cfg, counts)
    loss, _, _ = stage1_losses(model, (images, labels), cfg, torch.device("cpu"), log_pi=log_pi)
    model.eval()  # same BN behaviour as above is not needed: compare against the train-mode logits
    model.train()
    logits = model(images)
    assert torch.allclose(loss, logit_adjusted_loss(logits, labels, log_prior(counts), 0.5), atol=1e-6)
    assert loss_priors(load_config(None, [*TINY, "method=ce"]), counts) is None


def test_natural_sampler_yields_each_image_once_per_epoch():
    targets = [0] * 30 + [1] * 3
    sampler = NaturalSampler(targets, seed=3)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        assert sorted(sampler) == list(range(33))
    longer = NaturalSampler(targets, num_samples=70, seed=3)
    assert len(list(longer)) == 70 and sorted(list(longer)[:33]) == list(range(33))


def test_crt_reuses_ces_stage_one_and_trains_only_a_linear_layer(tmp_path, no_plots):
    """cRT = CE's stage 1 + this project's stage 2: in one sweep its stage 1 is a copy of the CE
    run's, and its classifier's backbone is that CE backbone bit for bit."""
    out = tmp_path / "sweep"
    args = ["sweep", *_sets(TINY), "--grid", "method=ce,crt", "--seeds", "0", "--out", str(out), "--posthoc-la"]
    assert main(args) == 0
    ce, crt = out / "method-ce" / "seed0", out / "method-crt" / "seed0"
    assert "stage 1 reused from" in (crt / "log.txt").read_text()
    ce_state = torch.load(ce / "checkpoints" / "pretrain.pt", weights_only=False)["model"]
    model = dscl.load(crt)
    backbone = model.classifier.backbone.state_dict()
    assert backbone.keys() == {k[len("backbone."):] for k in ce_state if k.startswith("backbone.")}
    assert all(torch.equal(v, ce_state[f"backbone.{k}"]) for k, v in backbone.items())
    results = json.loads((crt / "results.json").read_text())
    assert results["stage2"]["selected_on"] == "val"
    summary = (out / "summary.md").read_text()
    assert "method=crt + post-hoc LA" in summary and "method=ce + post-hoc LA" in summary


def test_stage_two_with_the_logit_adjusted_loss_on_natural_sampling(tmp_path, no_plots):
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), *_sets([*TINY, "method=scl", "linear.rebalance=loss"])]) == 0
    assert "natural sampling, logit-adjusted loss (tau 1)" in (out / "log.txt").read_text()
    results = json.loads((out / "results.json").read_text())
    assert results["posthoc_la"]["tau"] in [0.25 * i for i in range(9)]


def test_evaluate_logit_adjust_of_a_finished_run_matches_the_runs_own(tmp_path, no_plots):
    """``dscl evaluate RUN --logit-adjust`` (for runs older than the adjustment in results.json)
    gives what the run itself recorded, and writes nothing else into the run."""
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), *_sets([*TINY, "method=ce"])]) == 0
    before = (out / "results.json").read_text()
    assert main(["evaluate", str(out), "--logit-adjust"]) == 0
    again = json.loads((out / "evaluations" / "posthoc-la.json").read_text())
    assert again == json.loads(before)["posthoc_la"]
    assert (out / "results.json").read_text() == before


def test_linear_select_last_keeps_the_last_epoch_whatever_validation_says(tmp_path, no_plots):
    out = tmp_path / "run"
    overrides = [*TINY, "method=scl", "linear.epochs=3", "linear.select=last"]
    assert main(["run", "--out", str(out), *_sets(overrides)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["stage2"] == {"selected_on": "last_epoch", "best_epoch": 3, "best_val_top1": None}
    assert "last epoch kept (linear.select: last)" in (out / "log.txt").read_text()
