"""Class activation maps of the stage-2 classifier."""

import shutil

import pytest
import torch
from PIL import Image

from dscl.analysis import class_activation_maps
from dscl.cli import main
from dscl.models import Classifier, build_backbone


def test_the_mean_of_a_map_is_the_logit_of_its_class():
    # Bug caught: the standardisation of stage 2 (mean, std) or the bias left out of the map,
    # which would then not be the evidence the classifier actually sums.
    torch.manual_seed(0)
    model = Classifier(build_backbone("resnet32"), num_classes=4).eval()
    model.norm.mean.normal_()
    model.norm.std.uniform_(0.5, 2.0)
    images = torch.randn(3, 3, 32, 32)
    classes = torch.tensor([2, 0, 3])
    maps, logits = class_activation_maps(model, images, classes)
    assert maps.shape == (3, 8, 8)
    torch.testing.assert_close(maps.mean((1, 2)), logits[torch.arange(3), classes], rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(images), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("which", ["scl", "ce"])
def test_cli_writes_a_grid_for_each_kind_of_run(scl_run, ce_run, tmp_path, which):
    run = scl_run if which == "scl" else ce_run
    out = tmp_path / "cam.png"
    assert main(["analyze", "cam", str(run), "--per-class", "2", "--classes", "0", "4", "--target", "predicted",
                 "--device", "cpu", "--out", str(out)]) == 0
    assert Image.open(out).format == "PNG"


def test_cli_takes_image_files(scl_run, tmp_path):
    files = []
    for n, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        files += ["--image", str(tmp_path / f"{n}.jpg")]
        Image.new("RGB", (32, 32), colour).save(files[-1])
    assert main(["analyze", "cam", str(scl_run), *files, "--device", "cpu", "--out", str(tmp_path / "c.png")]) == 0


def test_cli_explains_a_run_without_stage_2(scl_run, tmp_path, capsys):
    partial = tmp_path / "partial"
    (partial / "checkpoints").mkdir(parents=True)
    shutil.copy(scl_run / "config.yaml", partial)
    shutil.copy(scl_run / "checkpoints" / "pretrain.pt", partial / "checkpoints")
    assert main(["analyze", "cam", str(partial), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "linear_best.pt: no such checkpoint (stage 2 has not finished there)" in err and "Traceback" not in err


def test_cli_names_an_unknown_class(scl_run, capsys):
    assert main(["analyze", "cam", str(scl_run), "--classes", "zebra", "--device", "cpu"]) == 2
    assert "--classes zebra: not a class of this run" in capsys.readouterr().err
