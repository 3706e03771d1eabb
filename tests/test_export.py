"""`dscl export` round trip: a tiny trained run exported in each format, reloaded in a fresh
Python process that imports only torch / torchvision / onnxruntime, gives dscl's logits."""

import importlib
import importlib.util
import json
import subprocess
import sys

import pytest
import torch

import dscl
from dscl.cli import main
from dscl.data import SyntheticLongTailed
from dscl.engine.trained import TrainedClassifier
from dscl.export import TOLERANCE, export, folded_fc
from dscl.models import Classifier, build_backbone, standalone

from conftest import TINY


def importable(*names: str) -> bool:
    try:
        for name in names:
            importlib.import_module(name)
    except ImportError:
        return False
    return True


HAS_ONNX = importable("onnx", "onnxruntime")
FORMATS = ["torchvision", "torchscript", pytest.param("onnx", marks=pytest.mark.skipif(
    not HAS_ONNX, reason="onnx / onnxruntime not installed (pip install 'dscl[onnx]')"))]

# Loads one export without dscl and saves its logits on the batch. argv: format, file, batch,
# output, the standalone ResNet-32 file, number of classes.
FRESH = r"""
import sys, runpy, torch
fmt, path, batch_file, out_file, resnet32_file, num_classes = sys.argv[1:]
images = torch.load(batch_file)
if fmt == "torchvision":
    net = runpy.run_path(resnet32_file)["ResNet32"](int(num_classes))
    net.load_state_dict(torch.load(path, weights_only=True), strict=True)
    logits = net.eval()(images).detach()
elif fmt == "torchscript":
    logits = torch.jit.load(path)(images).detach()
else:
    import onnxruntime
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    logits = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
assert "dscl" not in sys.modules
torch.save(logits, out_file)
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny end-to-end `ce` run: its classifier lives in checkpoints/pretrain.pt."""
    out = tmp_path_factory.mktemp("export") / "run"
    sets = [x for o in TINY + ["method=ce"] for x in ("--set", o)]
    assert main(["run", "--out", str(out), *sets]) == 0
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_in_a_fresh_process(run_dir, tmp_path, capsys, fmt):
    path = tmp_path / f"model.{fmt}"
    check = [] if fmt == "torchvision" else ["--no-check"]  # the export's own check, once is enough here
    assert main(["export", str(run_dir), "--format", fmt, "--out", str(path), *check]) == 0
    printed = capsys.readouterr().out
    assert str(path) in printed and ("checked in a fresh process" in printed) == (not check)
    if fmt == "torchvision":
        assert "standalone.py" in printed and "ResNet32(num_classes=5)" in printed
    sidecar = json.loads(path.with_name(path.name + ".json").read_text())
    model = dscl.load(run_dir)
    assert sidecar["classes"] == model.classes and sidecar["image_size"] == 32 and sidecar["mean"] == list(model.mean)
    test = SyntheticLongTailed("test", imbalance_ratio=10, num_classes=5, n_max=60, n_per_class_eval=10, seed=0)
    images = torch.stack([model.transform(test[i][0]) for i in range(0, len(test), 3)])  # (17, 3, 32, 32)
    torch.save(images, tmp_path / "images.pt")
    subprocess.run([sys.executable, "-I", "-c", FRESH, fmt, str(path), str(tmp_path / "images.pt"),
                    str(tmp_path / "logits.pt"), standalone.__file__, "5"], check=True)
    logits, expected = torch.load(tmp_path / "logits.pt"), model(images)
    assert (logits - expected).abs().max() <= TOLERANCE
    assert torch.equal(logits.argmax(1), expected.argmax(1))


def test_folded_fc_equals_standardise_then_fc():
    classifier = _classifier(build_backbone("resnet32"), 7)
    features = torch.randn(10, 64) * 3 + 1
    with torch.no_grad():
        assert torch.allclose(folded_fc(classifier)(features), classifier.head(features), atol=1e-5)


def _classifier(backbone, num_classes):
    classifier = Classifier(backbone, num_classes).eval()
    classifier.norm.fit(torch.randn(50, backbone.out_dim) * 4 + 2)
    return classifier


def test_torchvision_resnet_loads_into_the_plain_torchvision_model(tmp_path):
    """A ResNet-18 classifier with a fitted standardisation: checked in a fresh process against
    torchvision.models.resnet18() with its fc replaced, strict=True."""
    classifier = _classifier(build_backbone("resnet18", zero_init_residual=False), 3)
    model = TrainedClassifier(classifier, ["a", "b", "c"], 64, (0.5,) * 3, (0.25,) * 3,
                              {"backbone": "resnet18", "preprocessing": "as in training"}, tmp_path)
    message = export(model, "torchvision", tmp_path / "r18.pt")
    assert "torchvision.models.resnet18()" in message and "checked in a fresh process" in message
    state = torch.load(tmp_path / "r18.pt", weights_only=True)
    assert "conv1.weight" in state and state["fc.weight"].shape == (3, 512)


def test_unknown_format_and_missing_onnx_are_clear(run_dir, tmp_path, monkeypatch):
    model = dscl.load(run_dir)
    with pytest.raises(dscl.ConfigError, match="--format"):
        export(model, "pickle", tmp_path / "m")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(dscl.ConfigError, match=r"dscl\[onnx\]"):
        export(model, "onnx", tmp_path / "m.onnx")
