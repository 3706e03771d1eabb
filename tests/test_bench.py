import pytest
import torch
import torch.nn.functional as F

from dscl.bench import bench
from dscl.losses import decoupled_supcon_loss, patch_distillation_loss
from dscl.losses.dense import dense_decoupled_supcon_loss, dense_patch_distillation_loss


@pytest.mark.parametrize("reference", [False, True])
def test_bench_reports_every_figure(reference):
    result = bench(None, ["pretrain.batch_size=4", "pretrain.queue_size=64", "pretrain.num_patches=2",
                          "pretrain.key_bn_groups=2"], reference=reference, steps=1, warmup=1, print_json=False)
    for key in ("device", "method", "batch_size", "queue_size", "images_per_s", "step_ms", "peak_mem_mb",
                "ce_images_per_s", "ce_step_ms", "flop_ratio", "measured_ratio"):
        assert key in result
    assert result["variant"] == ("reference" if reference else "optimised")
    assert result["flop_ratio"] == pytest.approx((3 + 1 + 3 * 2 * 0.25) / 3, abs=1e-3)
    assert result["measured_ratio"] == pytest.approx(result["step_ms"] / result["ce_step_ms"], rel=1e-2)


def test_flop_ratio_of_the_paper_settings():
    cifar = (3 + 1 + 3 * 5 * (16 / 32) ** 2) / 3
    imagenet = (3 + 1 + 3 * 5 * (64 / 224) ** 2) / 3
    assert round(cifar, 2) == 2.58 and round(imagenet, 2) == 1.74


def test_dense_reference_losses_agree_with_factorised_ones():
    g = torch.Generator().manual_seed(0)
    q, k = (F.normalize(torch.randn(12, 16, generator=g), dim=1) for _ in range(2))
    y = torch.randint(0, 4, (12,), generator=g)
    queue = F.normalize(torch.randn(30, 16, generator=g), dim=1)
    qy = torch.randint(-1, 4, (30,), generator=g)
    for alpha in (0.1, None):
        torch.testing.assert_close(dense_decoupled_supcon_loss(q, k, y, queue, qy, alpha),
                                   decoupled_supcon_loss(q, k, y, queue, qy, alpha))
    t, s = (F.normalize(torch.randn(12, 3, 16, generator=g), dim=2) for _ in range(2))
    torch.testing.assert_close(dense_patch_distillation_loss(t, s, k, queue, qy), patch_distillation_loss(t, s, k, queue, qy))
