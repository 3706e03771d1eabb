"""Batched views: shapes, seeds, box statistics, geometry against roi_align, colour against
torchvision's per-image ops, flip and photometric probabilities."""

import pytest
import torch
from torchvision.ops import roi_align
from torchvision.transforms import functional as F

from dscl.data import CIFAR_MEAN, CIFAR_STD
from dscl.data.batched import (BatchedCETransform, BatchedEval, BatchedQueryView, BatchedViewPatch,
                               adjust_colour, gaussian_blur, random_patch_boxes,
                               random_resized_boxes)

ZERO, ONE = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # mean / std that keep values in [0, 1]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def seeded(seed, device="cpu"):
    return torch.Generator(device).manual_seed(seed)


def random_images(b=8, h=32, w=32, seed=0):
    """uint8 (B,H,W,3)."""
    return torch.randint(0, 256, (b, h, w, 3), dtype=torch.uint8, generator=seeded(seed))


def position_images(b, size=32):
    """R encodes the column, G the row: every pixel says where it is. (B,H,W,3)"""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    rgb = torch.stack([7 * xs + 3, 7 * ys + 3, torch.full_like(xs, 128)], -1)
    return rgb.to(torch.uint8).expand(b, -1, -1, -1).contiguous()


def to_unit(images):
    """The reference ToTensor: uint8 (B,H,W,3) -> float (B,3,H,W) in [0,1]."""
    return images.permute(0, 3, 1, 2).float().div(255)


@pytest.mark.parametrize("device", DEVICES)
def test_shapes_dtypes_and_device(device):
    imgs = random_images(4, 36, 40).to(device)
    t = BatchedViewPatch(32, 16, num_patches=5, mean=CIFAR_MEAN, std=CIFAR_STD)
    q, k, p, b = t(imgs, seeded(0, device))
    assert q.shape == k.shape == (4, 3, 32, 32) and p.shape == (4, 5, 3, 16, 16)
    assert b.shape == (4, 5, 4) and b.dtype == torch.float32
    assert q.dtype == k.dtype == p.dtype == torch.float32
    assert {x.device.type for x in (q, k, p, b)} == {device}
    channels_first = t(imgs.permute(0, 3, 1, 2), seeded(0, device))
    for a, c in zip((q, k, p, b), channels_first):
        assert torch.equal(a, c)  # (B,H,W,3) and (B,3,H,W) are the same batch
    big = random_images(2, 60, 50).to(device)
    q, k, p, b = BatchedViewPatch(48, 24, num_patches=3, blur=True)(big, seeded(0, device))
    assert q.shape == (2, 3, 48, 48) and p.shape == (2, 3, 3, 24, 24) and b.shape == (2, 3, 4)
    assert BatchedQueryView(32, blur=True)(imgs).shape == (4, 3, 32, 32)
    assert BatchedCETransform(32)(imgs).shape == BatchedEval(32)(imgs).shape == (4, 3, 32, 32)
    assert BatchedCETransform(96)(imgs).shape == BatchedEval(96)(imgs).shape == (4, 3, 96, 96)


def test_num_patches_zero():
    q, k, p, b = BatchedViewPatch(32, 16, num_patches=0)(random_images(3), seeded(0))
    assert q.shape == k.shape == (3, 3, 32, 32)
    assert p.shape == (3, 0, 3, 16, 16) and b.shape == (3, 0, 4)


def test_reproducible_from_seed():
    t, imgs = BatchedViewPatch(32, 16, blur=True), random_images(6)
    first, again, other = t(imgs, seeded(1)), t(imgs, seeded(1)), t(imgs, seeded(2))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not any(torch.equal(a, b) for a, b in zip(first, other))
    torch.manual_seed(3)
    global_rng = t(imgs)
    torch.manual_seed(3)
    assert all(torch.equal(a, b) for a, b in zip(global_rng, t(imgs)))


@pytest.mark.parametrize("size, scale", [(32, (0.05, 0.6)), (224, (0.05, 0.6)), (32, (0.3, 0.5))])
def test_boxes_inside_view_with_area_and_ratio_in_range(size, scale, check_patch_boxes):
    check_patch_boxes(random_patch_boxes(400, 5, size, scale, seeded(0)).view(-1, 4), size, scale)


def test_random_resized_boxes_in_range():
    boxes = random_resized_boxes(2000, 36, 40, (0.2, 1.0), seeded(0)).double()
    x1, y1, x2, y2 = boxes.unbind(1)
    assert torch.equal(boxes, boxes.round())
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= 40).all() and (y2 <= 36).all()
    area = (x2 - x1) * (y2 - y1) / (36 * 40)
    assert area.min() > 0.18 and area.max() <= 1.0
    full = random_resized_boxes(50, 32, 32, (1.0, 1.0), seeded(0))
    assert (full == torch.tensor([0.0, 0.0, 32.0, 32.0])).all()


def test_identity_crop_gives_the_normalised_input_exactly():
    imgs = random_images(64)
    t = BatchedViewPatch(32, 16, query_scale=(1.0, 1.0), mean=CIFAR_MEAN, std=CIFAR_STD,
                         photometric=False)
    query = t(imgs, seeded(0))[0]
    mean, std = torch.tensor(CIFAR_MEAN).view(3, 1, 1), torch.tensor(CIFAR_STD).view(3, 1, 1)
    expected = (to_unit(imgs) - mean) / std  # as ToTensor + Normalize
    same = [torch.equal(q, e) for q, e in zip(query, expected)]
    mirrored = [torch.equal(q, e.flip(-1)) for q, e in zip(query, expected)]
    assert all(s or m for s, m in zip(same, mirrored)) and any(same) and any(mirrored)


@pytest.mark.parametrize("seed", range(2))
def test_patches_are_roi_align_of_the_query_at_their_boxes(seed):
    t = BatchedViewPatch(32, 12, num_patches=5, mean=ZERO, std=ONE, photometric=False)
    query, _, patches, boxes = t(random_images(16, 36, 40, seed), seeded(seed))
    cut = roi_align(query, list(boxes), 12, spatial_scale=1.0, sampling_ratio=1,
                    aligned=True)  # (B*L,3,12,12), boxes as one (L,4) tensor per image
    cut = cut.view(16, 5, 3, 12, 12)
    err = (patches - cut).abs().amax((2, 3, 4))
    err_flipped = (patches - cut.flip(-1)).abs().amax((2, 3, 4))
    assert torch.minimum(err, err_flipped).max() < 1e-5
    assert (err < 1e-5).any() and (err_flipped < 1e-5).any()  # patches get their own flip


def test_patches_cover_their_boxes_in_the_query_view():
    # With position images each query pixel says where it is, whatever the crop and flip: the
    # values of a patch must stay within those of its box (half a pixel of slack, the
    # bilinear samples at the box's border).
    t = BatchedViewPatch(32, 16, num_patches=5, query_scale=(0.5, 1.0), mean=ZERO, std=ONE,
                         photometric=False)
    query, _, patches, boxes = t(position_images(16), seeded(0))
    for q, ps, bs in zip(query, patches, boxes):
        for p, (x1, y1, x2, y2) in zip(ps, bs.long().tolist()):
            box = q[:2, y1:y2, x1:x2]
            lo, hi = box.amin((1, 2)), box.amax((1, 2))
            slack = 7 / 255  # one pixel step of the ramp, generous for crop scaling
            assert (p[:2].amin((1, 2)) >= lo - slack).all()
            assert (p[:2].amax((1, 2)) <= hi + slack).all()


def test_samples_of_a_batch_get_their_own_geometry():
    imgs = random_images(1).expand(32, -1, -1, -1)
    q, k, p, b = BatchedViewPatch(32, 16, photometric=False)(imgs, seeded(0))
    assert len({tuple(x.flatten().tolist()) for x in q}) > 24
    assert len({tuple(x.flatten().tolist()) for x in k}) > 24
    assert len({tuple(x.flatten().tolist()) for x in b}) == 32


def test_flip_probability_is_one_half():
    imgs = position_images(4000, 8)
    t = BatchedQueryView(8, scale=(1.0, 1.0), mean=ZERO, std=ONE, photometric=False)
    query = t(imgs, seeded(0))
    flipped = query[:, 0, 0, 0] > query[:, 0, 0, 1]
    assert 0.45 < flipped.float().mean().item() < 0.55
    t = BatchedViewPatch(8, 8, num_patches=4, patch_scale=(1.0, 1.0), mean=ZERO, std=ONE,
                         photometric=False)
    query, _, patches, _ = t(imgs[:1000], seeded(0))
    mirrored = patches[:, :, 0, 0, 0] != query[:, None, 0, 0, 0]  # whole-view patches
    assert torch.equal(patches, torch.where(mirrored[..., None, None, None],
                                            query[:, None].flip(-1), query[:, None]))
    assert 0.45 < mirrored.float().mean().item() < 0.55


def test_colour_ops_equal_torchvision_per_image():
    x = torch.rand(6, 3, 10, 12, generator=seeded(0))
    f = torch.tensor([0.6, 0.8, 1.0, 1.1, 1.3, 1.4])
    shift = torch.tensor([-0.1, -0.05, 0.0, 0.02, 0.07, 0.1])
    ref = torch.stack([F.adjust_brightness(img, float(v)) for img, v in zip(x, f)])
    torch.testing.assert_close(adjust_colour(x, brightness=f), ref, atol=1e-6, rtol=0)
    ref = torch.stack([F.adjust_contrast(img, float(v)) for img, v in zip(x, f)])
    torch.testing.assert_close(adjust_colour(x, contrast=f), ref, atol=1e-6, rtol=0)
    ref = torch.stack([F.adjust_saturation(img, float(v)) for img, v in zip(x, f)])
    torch.testing.assert_close(adjust_colour(x, saturation=f), ref, atol=1e-6, rtol=0)
    ref = torch.stack([F.adjust_hue(img, float(v)) for img, v in zip(x, shift)])
    torch.testing.assert_close(adjust_colour(x, hue=shift), ref, atol=1e-5, rtol=0)
    grey = x.mean(1, keepdim=True).expand_as(x)  # hue of grey pixels is defined as 0
    torch.testing.assert_close(adjust_colour(grey, hue=shift), grey, atol=1e-6, rtol=0)
    ones = torch.ones(6)
    assert torch.equal(adjust_colour(x, ones, ones, ones, torch.zeros(6)), x)


def test_gaussian_blur_equals_torchvision_per_image():
    x = torch.rand(4, 3, 16, 16, generator=seeded(0))
    sigma = torch.tensor([0.1, 0.5, 1.2, 2.0])
    ref = torch.stack([F.gaussian_blur(img, [13, 13], [float(s)]) for img, s in zip(x, sigma)])
    torch.testing.assert_close(gaussian_blur(x, sigma), ref, atol=1e-5, rtol=0)


def test_photometric_ops_apply_with_their_probabilities():
    imgs = random_images(2000, 8, 8)
    coloured = BatchedQueryView(8, mean=ZERO, std=ONE)(imgs, seeded(0))
    plain = BatchedQueryView(8, mean=ZERO, std=ONE, photometric=False)(imgs, seeded(0))
    changed = (coloured != plain).flatten(1).any(1).float().mean().item()
    assert abs(changed - (1 - 0.2 * 0.8)) < 0.04  # unchanged only without jitter and grey
    grey = ((coloured[:, 0] == coloured[:, 1]) & (coloured[:, 1] == coloured[:, 2]))
    assert abs(grey.flatten(1).all(1).float().mean().item() - 0.2) < 0.04
    t = BatchedViewPatch(8, 4, num_patches=1, mean=ZERO, std=ONE)
    keys = t(imgs[:200], seeded(0))[1]
    t.photometric = False
    assert (keys != t(imgs[:200], seeded(0))[1]).flatten(1).any(1).all()  # key jitter p=1


def test_ce_transform_is_a_padded_shifted_crop():
    imgs = random_images(32)
    out = BatchedCETransform(32, ZERO, ONE)(imgs, seeded(0))
    padded = torch.nn.functional.pad(to_unit(imgs), (4, 4, 4, 4))  # (B,3,40,40)
    found = set()
    for o, p in zip(out, padded):
        matches = [(dy, dx, mirror) for dy in range(9) for dx in range(9) for mirror in (0, 1)
                   if torch.equal(o, p[:, dy:dy + 32, dx:dx + 32].flip([-1] * mirror))]
        assert len(matches) == 1
        found.add(matches[0])
    assert {m for _, _, m in found} == {0, 1} and any(dy != dx for dy, dx, _ in found)
    assert len({dy for dy, _, _ in found}) > 4 and len({dx for _, dx, _ in found}) > 4


def test_eval_transform():
    imgs = random_images(4)
    expected = (to_unit(imgs) - torch.tensor(CIFAR_MEAN).view(3, 1, 1)) / torch.tensor(
        CIFAR_STD).view(3, 1, 1)
    assert torch.equal(BatchedEval(32, CIFAR_MEAN, CIFAR_STD)(imgs), expected)
    resized = BatchedEval(24, ZERO, ONE)(imgs)
    ref = torch.stack([F.resize(x, [24, 24], antialias=True) for x in to_unit(imgs)])
    torch.testing.assert_close(resized, ref)


def test_rejects_bad_input():
    with pytest.raises(TypeError):
        BatchedEval(32)(torch.rand(2, 32, 32, 3))
    with pytest.raises(ValueError):
        BatchedEval(32)(torch.zeros(2, 32, 32, 4, dtype=torch.uint8))
    with pytest.raises(ValueError):
        BatchedViewPatch(32, 16, num_patches=-1)


def test_fused_colour_equals_torchvision_ops_in_order():
    # One draw of the batch's random numbers decides every column (key, query, then patches):
    # the jitter with its probability, then grayscale, each op torchvision's on the crop.
    from dscl.data.batched import _EVENTS, _FACTORS, _NUM_RANDOM

    imgs, n = random_images(48), 3
    t = BatchedViewPatch(32, 16, num_patches=n, mean=ZERO, std=ONE)
    coloured = t(imgs, seeded(4))
    t.photometric = False
    plain = t(imgs, seeded(4))
    u = torch.rand(48, 2 + n, _NUM_RANDOM, generator=seeded(4))

    def crops(views):  # key, query, patches
        return [views[1], views[0], *views[2].unbind(1)]

    settings = [(1.0, 0.0, 0.0), (0.8, 0.1, 0.2)] + [(0.8, 0.1, 0.2)] * n  # jitter p, hue, grey p
    jittered = greyed = 0
    for col, (out, ref, (p_jitter, hue, p_grey)) in enumerate(zip(crops(coloured), crops(plain), settings)):
        for i in range(48):
            flip, jitter, grey, _ = (u[i, col, _EVENTS] < torch.tensor([0.5, p_jitter, p_grey, 0.0])).tolist()
            b, c, s, h = u[i, col, _FACTORS].tolist()
            img = ref[i]
            if jitter:
                img = F.adjust_brightness(img, 0.6 + 0.8 * b)
                img = F.adjust_contrast(img, 0.6 + 0.8 * c)
                img = F.adjust_saturation(img, 0.6 + 0.8 * s)
                if hue:
                    img = F.adjust_hue(img, hue * (2 * h - 1))
            if grey:
                img = F.rgb_to_grayscale(img, 3)
            jittered, greyed = jittered + jitter, greyed + grey
            torch.testing.assert_close(out[i], img, atol=2e-5, rtol=0)
    assert 0 < greyed < jittered < 48 * (2 + n)


def test_view_pipeline_is_a_few_operators():
    # Each operator is a kernel launch on a GPU: the whole batch's views, at any batch size,
    # stay a small fixed number of them (benchmarks/op_count.py counts the whole step).
    from torch.utils._python_dispatch import TorchDispatchMode

    free = {"aten.view", "aten._unsafe_view", "aten.expand", "aten.t", "aten.transpose",
            "aten.permute", "aten.slice", "aten.select", "aten.unsqueeze", "aten.squeeze",
            "aten.as_strided", "aten.alias", "aten.unbind", "aten.split", "aten.empty",
            "aten.empty_like", "aten.new_empty", "aten.new_empty_strided", "aten.empty_strided",
            "aten.detach"}

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += str(func.overloadpacket) not in free
            return func(*args, **(kwargs or {}))

    t = BatchedViewPatch(32, 16, num_patches=5, mean=CIFAR_MEAN, std=CIFAR_STD)
    counts = []
    for b in (8, 64):
        imgs, gen = random_images(b), seeded(0)
        t(imgs, gen)  # plans are made once per layout
        with Count() as count:
            t(imgs, gen)
        counts.append(count.n)
    assert counts[0] == counts[1] <= 120
