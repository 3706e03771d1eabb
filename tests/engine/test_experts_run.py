"""``model.experts`` end to end on the tiny synthetic set: 1 expert is today's run, bit for bit;
3 experts train both stages, report each expert, and load, predict and export as one ensemble."""

import json

import pytest
import torch

import dscl
from dscl.bench import bench
from dscl.cli import main
from dscl.data import SyntheticLongTailed
from dscl.export import export
from dscl.models import ExpertClassifier

from conftest import TINY

ACCURACIES = ("overall", "many", "medium", "few", "val_top1", "per_class", "stage2")


def tiny_run(out, *overrides) -> dict:
    sets = [x for o in [*TINY, *overrides] for x in ("--set", o)]
    with pytest.MonkeyPatch.context() as patch:  # the plots take longer than the tiny run
        patch.setattr("dscl.analysis.plots.plot_finished_run", lambda path: None)
        assert main(["run", "--out", str(out), *sets]) == 0
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory):
    out = tmp_path_factory.mktemp("experts") / "run"
    return out, tiny_run(out, "model.experts=3")


def test_one_expert_is_todays_model_bit_for_bit(tmp_path):
    """Against a run of the default config, whose code path model.experts leaves as it was."""
    short = ["pretrain.epochs=1", "linear.epochs=1"]
    default, one = tiny_run(tmp_path / "default", *short), tiny_run(tmp_path / "one", *short, "model.experts=1")
    assert {k: one[k] for k in ACCURACIES} == {k: default[k] for k in ACCURACIES}
    assert "experts" not in one
    for name in ("pretrain", "linear_best"):
        a, b = (torch.load(p / "checkpoints" / f"{name}.pt", weights_only=False) for p in (tmp_path / "default",
                                                                                          tmp_path / "one"))
        for part in ("model", "fc", "norm"):
            if part in a:
                assert a[part].keys() == b[part].keys()
                assert all(torch.equal(v, b[part][k]) for k, v in a[part].items())


def test_three_experts_report_many_medium_few_each(ensemble):
    out, results = ensemble
    assert len(results["experts"]) == 3
    for expert in results["experts"]:
        assert set(expert) == {"overall", "many", "medium", "few", "per_class"}
        assert len(expert["per_class"]) == 5 and expert["medium"] is not None and expert["few"] is not None
    state = torch.load(out / "checkpoints" / "pretrain.pt", weights_only=False)["model"]
    assert {k for k in state if k.endswith(".ptr")} == {f"queue.queues.{e}.ptr" for e in range(3)}
    assert "test top-1 of each expert alone" in (out / "log.txt").read_text()


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_three_experts_load_predict_and_export(ensemble, tmp_path, capsys):
    out, results = ensemble
    model = dscl.load(out)
    assert isinstance(model.classifier, ExpertClassifier) and model.card["experts"] == 3
    test = SyntheticLongTailed("test", imbalance_ratio=10, num_classes=5, n_max=60, n_per_class_eval=10, seed=0)
    images = torch.stack([model.transform(test[i][0]) for i in range(len(test))])
    logits = model(images)
    experts = model.classifier.expert_logits(model.classifier.backbone(images))
    torch.testing.assert_close(logits, experts.mean(1))
    labels = torch.tensor([test[i][1] for i in range(len(test))])
    for e, expert in enumerate(results["experts"]):
        assert 100.0 * float((experts[:, e].argmax(1) == labels).double().mean()) == pytest.approx(expert["overall"])
    # tests/test_export.py covers the check in a fresh process; here the traced ensemble, in-process
    export(model, "torchscript", tmp_path / "m.ts", check=False)
    assert "3 experts" in json.loads((tmp_path / "m.ts.json").read_text())["output"]
    torch.testing.assert_close(torch.jit.load(str(tmp_path / "m.ts"))(images[:7]), logits[:7], atol=1e-4, rtol=1e-4)
    with pytest.raises(dscl.ConfigError, match="ensemble of 3 experts .* no torchvision equivalent"):
        export(model, "torchvision", tmp_path / "m.pt")
    image = tmp_path / "x.png"
    test[0][0].save(image)
    assert main(["predict", str(out), str(image)]) == 0
    assert str(image) in capsys.readouterr().out


def test_bench_counts_parameters_and_multiply_adds_of_three_experts():
    small = ["pretrain.batch_size=4", "pretrain.queue_size=16", "pretrain.num_patches=2", "pretrain.key_bn_groups=2"]
    one = bench(None, small, steps=1, warmup=0, print_json=False)
    three = bench(None, [*small, "model.experts=3"], steps=1, warmup=0, print_json=False)
    assert one["experts"] == 1 and three["experts"] == 3
    assert one["backbone_params"] == 463504 and one["backbone_macs"] == 68861952  # ResNet-32's known figures
    assert three["backbone_params"] > one["backbone_params"] and three["backbone_macs"] > one["backbone_macs"]
    assert three["step_ms"] > 0 and three["ce_step_ms"] > 0
