"""View / patch transform: shapes, box statistics, patches equal roi_align of the query view."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import roi_align
from torchvision.transforms import functional as F

from dscl.data import (CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD, ViewPatchTransform,
                       ce_train_transform, eval_transform, query_view_transform)

ZERO, ONE = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # mean / std that keep ToTensor values


def random_image(w=40, h=36, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))


def position_image(size=32):
    """R encodes the column, G the row: every pixel says where it is."""
    ys, xs = np.mgrid[0:size, 0:size]
    rgb = np.stack([7 * xs + 3, 7 * ys + 3, np.full_like(xs, 128)], -1).astype(np.uint8)
    return Image.fromarray(rgb)


def roi(query, box):
    """Independent reference: roi_align at the box's own size, one sample per pixel."""
    x1, y1, x2, y2 = (int(v) for v in box)
    out = roi_align(query[None], [box[None]], output_size=(y2 - y1, x2 - x1),
                    spatial_scale=1.0, sampling_ratio=1, aligned=True)
    return out[0]


def test_output_shapes_and_types():
    t = ViewPatchTransform(32, 16, num_patches=5, mean=CIFAR_MEAN, std=CIFAR_STD)
    query, key, patches, boxes = t(random_image())
    assert query.shape == key.shape == (3, 32, 32)
    assert patches.shape == (5, 3, 16, 16)
    assert boxes.shape == (5, 4) and boxes.dtype == torch.float32
    assert query.dtype == key.dtype == patches.dtype == torch.float32
    t = ViewPatchTransform(48, 24, num_patches=3, blur=True)
    q, k, p, b = t(random_image(60, 50))
    assert q.shape == (3, 48, 48) and p.shape == (3, 3, 24, 24) and b.shape == (3, 4)


@pytest.mark.parametrize("size, scale", [(32, (0.05, 0.6)), (224, (0.05, 0.6)), (32, (0.3, 0.5))])
def test_boxes_inside_view_with_area_and_ratio_in_range(size, scale, check_patch_boxes):
    torch.manual_seed(0)
    t = ViewPatchTransform(size, size // 2, patch_scale=scale)
    check_patch_boxes(torch.tensor([t.sample_box() for _ in range(2000)]), size, scale)


def test_full_scale_patch_is_the_whole_view():
    t = ViewPatchTransform(32, 16, patch_scale=(1.0, 1.0))
    assert {t.sample_box() for _ in range(20)} == {(0, 0, 32, 32)}


@pytest.mark.parametrize("seed", range(4))
def test_patches_are_query_crops_at_their_boxes(seed):
    t = ViewPatchTransform(32, 12, num_patches=5, mean=ZERO, std=ONE, photometric=False)
    img = random_image(seed=seed)
    torch.manual_seed(seed)
    query, _, patches, boxes = t(img)
    torch.manual_seed(seed)
    g1, boxes_again = t.sample_geometry(img)
    assert torch.equal(boxes, boxes_again)
    torch.testing.assert_close(query, F.to_tensor(g1), atol=0, rtol=0)
    for patch, box in zip(patches, boxes):
        x1, y1, x2, y2 = (int(v) for v in box)
        cut = F.to_tensor(g1.crop((x1, y1, x2, y2)))  # (3,h,w) before resizing
        torch.testing.assert_close(query[:, y1:y2, x1:x2], cut, atol=0, rtol=0)
        torch.testing.assert_close(roi(query, box), cut, atol=1e-6, rtol=0)
        resized = F.to_tensor(F.resize(g1.crop((x1, y1, x2, y2)), [12, 12]))
        assert torch.equal(patch, resized) or torch.equal(patch, resized.flip(-1))


def test_boxes_address_query_pixels_after_its_flip():
    # query_scale (1, 1) makes g1 the whole image, possibly mirrored: pixel values then
    # identify where in the original image each query pixel came from.
    t = ViewPatchTransform(32, 8, query_scale=(1.0, 1.0), mean=ZERO, std=ONE, photometric=False)
    seen_flip = set()
    for seed in range(12):
        torch.manual_seed(seed)
        query, _, _, boxes = t(position_image())
        flipped = query[0, 0, 0] > query[0, 0, 1]
        seen_flip.add(bool(flipped))
        for box in boxes:
            x1, y1, x2, y2 = (int(v) for v in box)
            out = roi(query, box) * 255
            cols = torch.arange(x1, x2, dtype=torch.float32)
            if flipped:
                cols = 31 - cols
            rows = torch.arange(y1, y2, dtype=torch.float32)
            torch.testing.assert_close(out[0], (7 * cols + 3).expand(y2 - y1, -1), atol=1e-3,
                                       rtol=0)
            torch.testing.assert_close(out[1], (7 * rows[:, None] + 3).expand(-1, x2 - x1),
                                       atol=1e-3, rtol=0)
    assert seen_flip == {True, False}


def test_patch_flips_are_independent_and_photometric_ops_apply():
    img = random_image(seed=3)
    t = ViewPatchTransform(32, 32, num_patches=5, patch_scale=(1.0, 1.0), mean=ZERO, std=ONE,
                           photometric=False)
    torch.manual_seed(0)
    query, _, patches, _ = t(img)  # whole-view patches: each equals the query or its mirror
    same = [torch.equal(p, query) for p in patches]
    mirrored = [torch.equal(p, query.flip(-1)) for p in patches]
    assert all(s or m for s, m in zip(same, mirrored)) and any(same) and any(mirrored)
    coloured = ViewPatchTransform(32, 16, mean=ZERO, std=ONE, photometric=True)
    changed = 0
    for seed in range(10):
        torch.manual_seed(seed)
        q, _, _, _ = coloured(img)
        torch.manual_seed(seed)
        g1, _ = coloured.sample_geometry(img)
        changed += not torch.equal(q, F.to_tensor(g1))
    assert changed >= 5  # jitter p=0.8, grayscale p=0.2


def test_key_view_is_an_independent_crop():
    t = ViewPatchTransform(32, 16, mean=ZERO, std=ONE, photometric=False)
    torch.manual_seed(0)
    differ = sum(not torch.equal(*t(random_image(seed=s))[:2]) for s in range(5))
    assert differ == 5


def test_query_view_and_supervised_transforms():
    img = random_image(32, 32)
    torch.manual_seed(0)
    assert query_view_transform(32, mean=CIFAR_MEAN, std=CIFAR_STD)(img).shape == (3, 32, 32)
    assert query_view_transform(64, blur=True)(random_image(80, 70)).shape == (3, 64, 64)
    ce = ce_train_transform(32, ZERO, ONE)
    outs = [ce(img) for _ in range(20)]
    assert all(o.shape == (3, 32, 32) for o in outs)
    # pad-4 random crop: some crops show the zero padding along a border
    assert any((o[:, 0, :] == 0).all() or (o[:, :, 0] == 0).all() or (o[:, -1, :] == 0).all()
               or (o[:, :, -1] == 0).all() for o in outs)
    assert ce_train_transform(224)(random_image(300, 260)).shape == (3, 224, 224)


def test_eval_transform():
    img = random_image(32, 32)
    expected = F.normalize(F.to_tensor(img), CIFAR_MEAN, CIFAR_STD)
    torch.testing.assert_close(eval_transform(32, CIFAR_MEAN, CIFAR_STD)(img), expected,
                               atol=0, rtol=0)
    assert eval_transform(32)(random_image(40, 36)).shape == (3, 32, 32)
    big = random_image(400, 300)
    ref = F.normalize(F.to_tensor(F.center_crop(F.resize(big, 256), 224)), IMAGENET_MEAN,
                      IMAGENET_STD)
    torch.testing.assert_close(eval_transform(224, IMAGENET_MEAN, IMAGENET_STD)(big), ref)
    assert len(CIFAR_MEAN) == len(CIFAR_STD) == len(IMAGENET_MEAN) == len(IMAGENET_STD) == 3
