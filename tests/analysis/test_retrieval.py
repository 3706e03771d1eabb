"""Patch-query retrieval with response maps (paper Fig. 1, 4)."""

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dscl.analysis import FeatureSpace, response_maps, retrieve
from dscl.analysis.retrieval import ExpertHeads
from dscl.analysis.runs import check_box
from dscl.cli import main
from dscl.errors import ArgumentError
from dscl.models import MomentumContrast, MultiExpertContrast, build_backbone, build_multi_expert_backbone


def _model(seed=0):
    torch.manual_seed(seed)
    return MomentumContrast(build_backbone("resnet32"), feature_dim=16, queue_size=8).eval()


def test_patch_feature_is_the_pbsd_teacher():
    # Bug caught: a patch pooled differently from PBSD's teacher (no 1/stride scale, other ROI
    # size, no projection head), so retrieval would not show what the distillation learns from.
    model = _model()
    space = FeatureSpace(model.encoder, model.head)
    images = torch.randn(3, 3, 32, 32)
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0], [5.0, 7.0, 30.0, 20.0], [10.0, 3.0, 14.0, 31.0]])
    with torch.no_grad():
        u = model.encoder.forward_features(images)
        teacher = model.patch_teacher(u, boxes[:, None, :])[:, 0]  # (B, L=1, D)
        mine = space.patch(space.feature_map(images), boxes)
    torch.testing.assert_close(mine, teacher)


def test_retrieve_ranks_by_cosine_similarity_and_skips_the_excluded_row():
    model = _model(1)
    space = FeatureSpace(model.encoder, model.head)
    query, box = torch.randn(3, 32, 32), (4.0, 4.0, 20.0, 24.0)
    with torch.no_grad():
        patch = space.patch(space.feature_map(query[None]), torch.tensor([box]))[0]
    g = torch.Generator().manual_seed(0)
    gallery = F.normalize(torch.randn(20, patch.shape[0], generator=g), dim=1)
    gallery[7] = patch  # the most similar row there can be
    gallery[3] = F.normalize(patch + 0.3 * gallery[3], dim=0)  # the next one
    top, sims, feature = retrieve(space, query, box, gallery, k=2)
    assert top.tolist() == [7, 3]
    assert float(sims[0]) == pytest.approx(1.0, abs=1e-5) and sims[0] >= sims[1]
    torch.testing.assert_close(feature, patch)
    top, _, _ = retrieve(space, query, box, gallery, k=2, exclude=7)
    assert top.tolist()[0] == 3


def test_response_maps_are_cell_wise_cosine_similarities():
    model = _model(2)
    space = FeatureSpace(model.encoder, model.head)
    images = torch.randn(2, 3, 32, 32)
    patch = F.normalize(torch.randn(16), dim=0)
    maps = response_maps(space, images, patch)
    assert maps.shape == (2, 8, 8)  # ResNet-32: stride 4
    with torch.no_grad():
        u = model.encoder.forward_features(images)
        cell = F.normalize(model.head(u[1, :, 5, 2][None]), dim=1)[0]
    assert float(maps[1, 5, 2]) == pytest.approx(float(cell @ patch), abs=1e-5)


def test_an_expert_runs_similarity_is_the_mean_of_its_experts():
    # Bug caught: the experts' features compared side by side through one expert's head, or
    # without normalising each expert's projection, so one expert would dominate the ranking.
    torch.manual_seed(3)
    model = MultiExpertContrast(build_multi_expert_backbone("resnet32", 3), feature_dim=16, queue_size=8).eval()
    space = FeatureSpace(model.encoder, ExpertHeads(model.heads))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        u = space.feature_map(images)
        mine = space.image(u)
        own = [F.normalize(g(m.mean((2, 3))), dim=1) for g, m in zip(model.heads, model.encoder.expert_maps(images))]
    expected = sum(float(e[0] @ e[1]) for e in own) / 3
    assert float(mine[0] @ mine[1]) == pytest.approx(expected, abs=1e-5)
    assert torch.linalg.vector_norm(mine, dim=1).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)


@pytest.mark.parametrize("box", [(-1, 0, 10, 10), (0, 0, 33, 10), (5, 5, 5, 9), (10, 0, 4, 8)])
def test_a_box_outside_the_image_is_refused(box):
    with pytest.raises(ArgumentError, match="inside the 32x32"):
        check_box(box, 32)


def test_cli_draws_one_row_per_run(scl_run, ce_run, experts_run, tmp_path):
    out = tmp_path / "retrieval.png"
    assert main(["analyze", "retrieval", str(scl_run), str(ce_run), str(experts_run), "--index", "3",
                 "--box", "2,2,18,20", "--k", "2", "--device", "cpu", "--out", str(out)]) == 0
    image = Image.open(out)
    assert image.format == "PNG" and image.height > 500  # three rows of 1.75 in at 110 dpi


def test_cli_takes_an_image_file_and_a_random_box(scl_run, tmp_path):
    file = tmp_path / "mine.png"
    Image.new("RGB", (50, 40), (200, 30, 30)).save(file)
    out = tmp_path / "r.png"
    assert main(["analyze", "retrieval", str(scl_run), "--image", str(file), "--device", "cpu", "--out", str(out)]) == 0
    assert Image.open(out).format == "PNG"


@pytest.mark.parametrize("args, words", [
    (["--box", "0,0,40,10"], "does not lie inside"),
    (["--box", "1,2,3"], "four numbers"),
    (["--index", "100000"], "--index 100000"),
    (["--image", "no-such-file.png"], "not found"),
])
def test_cli_errors_are_one_clear_line(scl_run, tmp_path, capsys, args, words):
    assert main(["analyze", "retrieval", str(scl_run), *args, "--device", "cpu", "--out", str(tmp_path / "r.png")]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_cli_refuses_an_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["analyze", "retrieval", str(tmp_path / "empty")]) == 2
    assert "holds no dscl run (the folder is empty)" in capsys.readouterr().err
