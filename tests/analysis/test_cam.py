"""Class activation maps of the stage-2 classifier."""

import shutil

import pytest
import torch
from PIL import Image

from dscl.analysis import class_activation_maps
from dscl.cli import main
from dscl.models import Classifier, ExpertClassifier, build_backbone, build_multi_expert_backbone


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


def test_the_mean_of_an_ensemble_map_is_the_ensemble_logit():
    # Bug caught: an expert run's map built from one expert's layer, or without the 1/E of the
    # mean over experts, so the map would not sum to what the ensemble predicts.
    torch.manual_seed(0)
    model = ExpertClassifier(build_multi_expert_backbone("resnet32", 3), num_classes=4).eval()
    for norm in model.norm.experts:
        norm.mean.normal_()
        norm.std.uniform_(0.5, 2.0)
    images = torch.randn(2, 3, 32, 32)
    classes = torch.tensor([3, 1])
    maps, logits = class_activation_maps(model, images, classes)
    torch.testing.assert_close(maps.mean((1, 2)), logits[torch.arange(2), classes], rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(images), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("which", ["scl", "ce", "experts"])
def test_cli_writes_a_grid_for_each_kind_of_run(scl_run, ce_run, experts_run, tmp_path, which):
    run = {"scl": scl_run, "ce": ce_run, "experts": experts_run}[which]
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
    assert "linear_best.pt: no such checkpoint; stage 2 did not finish" in err and "Traceback" not in err


def test_cli_names_an_unknown_class(scl_run, capsys):
    assert main(["analyze", "cam", str(scl_run), "--classes", "zebra", "--device", "cpu"]) == 2
    assert "--classes zebra: not a class of this run" in capsys.readouterr().err


def test_cli_reads_published_weights_by_name_without_their_data(tmp_path):
    # Image files need only model.json (classes, input size): no data.root on this machine.
    file = tmp_path / "mine.png"
    Image.new("RGB", (40, 40), (30, 200, 30)).save(file)
    out = tmp_path / "cam.png"
    assert main(["analyze", "cam", "tinyimagenet-lt-r100/ce", "--image", str(file), "--device", "cpu",
                 "--out", str(out)]) == 0
    assert Image.open(out).format == "PNG"


def test_cli_data_root_moves_the_data_not_the_run(scl_run, tmp_path):
    # Bug caught: --data-root written into the config the checkpoints are checked against, so
    # every checkpoint "belonged to a different run" (data.root is part of a run's identity).
    assert main(["analyze", "cam", str(scl_run), "--data-root", str(tmp_path), "--classes", "0", "--device", "cpu",
                 "--out", str(tmp_path / "c.png")]) == 0
