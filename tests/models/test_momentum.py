import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

from dscl.models import GroupedBatchNorm2d, MomentumContrast, build_backbone, momentum


def small_model(queue_size=32, groups=4):
    torch.manual_seed(0)
    return MomentumContrast(build_backbone("resnet32"), feature_dim=16, queue_size=queue_size,
                            momentum=0.9, key_bn_groups=groups)


def test_ema_update_parameters_only():
    model = small_model()
    with torch.no_grad():
        for p in [*model.encoder.parameters(), *model.head.parameters()]:
            p.add_(torch.randn_like(p))
        for m in model.key_encoder.modules():  # running stats of the key encoder are not EMA'd
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.fill_(3.0)
    before = {n: p.clone() for n, p in model.key_encoder.named_parameters()}
    query = dict(model.encoder.named_parameters())
    model.momentum_update()
    for name, p in model.key_encoder.named_parameters():
        torch.testing.assert_close(p, 0.9 * before[name] + 0.1 * query[name])
    for m in model.key_encoder.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert bool((m.running_mean == 3.0).all())
    assert not any(p.requires_grad for p in model.key_encoder.parameters())


def test_grouped_batchnorm_normalises_each_group_alone():
    bn = torch.nn.BatchNorm2d(3)
    torch.nn.init.uniform_(bn.weight)
    torch.nn.init.uniform_(bn.bias)
    grouped = copy.deepcopy(bn)
    grouped.__class__ = GroupedBatchNorm2d
    grouped.groups = 4
    x = torch.randn(8, 3, 5, 5) * 3 + 1
    out = grouped(x)
    for g in range(4):
        members = torch.arange(g, 8, 4)  # sample i belongs to group i % 4
        expected = F.batch_norm(x[members], None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
        torch.testing.assert_close(out[members], expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out, bn(x), atol=1e-3)


def test_keys_do_not_depend_on_batch_order():
    """Shuffle + grouped BN must give each key its own sample's feature back in place."""
    model = small_model(groups=1)  # one group: BN statistics are permutation invariant
    x = torch.randn(8, 3, 32, 32)
    keys = model.encode_keys(x)
    perm = torch.randperm(8)
    torch.testing.assert_close(model.encode_keys(x[perm]), keys[perm], rtol=1e-4, atol=1e-5)
    assert torch.allclose(keys.norm(dim=1), torch.ones(8))


def test_forward_shapes_and_gradients():
    model = small_model()
    b, num_patches = 4, 3
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0], [8.0, 4.0, 32.0, 20.0], [2.0, 2.0, 10.0, 30.0]]).repeat(b, 1, 1)
    out = model(torch.randn(b, 3, 32, 32), torch.randn(b, 3, 32, 32), torch.randn(b, num_patches, 3, 16, 16), boxes)
    assert out.query.shape == (b, 16) and out.key.shape == (b, 16)
    assert out.teacher.shape == (b, num_patches, 16) and out.student.shape == (b, num_patches, 16)
    assert out.query.requires_grad and out.student.requires_grad
    assert not out.key.requires_grad and not out.teacher.requires_grad


def test_patch_teacher_pools_the_box_region():
    """Teacher = head(mean of roi_align 2x2 at spatial_scale 1/stride) on the query feature map."""
    model = small_model()
    fmap = torch.randn(2, 64, 8, 8)
    boxes = torch.tensor([[[0.0, 0.0, 32.0, 32.0]], [[8.0, 8.0, 24.0, 24.0]]])  # whole view; middle
    out = model.patch_teacher(fmap, boxes)
    # whole-view box, 2x2 bins of 4x4 cells each: the mean equals the global average pool
    expected_whole = F.normalize(model.head(fmap[0].mean((1, 2))[None]), dim=1)
    torch.testing.assert_close(out[0], expected_whole, rtol=1e-4, atol=1e-5)
    # middle box in pixels 8..24 is feature cells 2..6
    expected_mid = F.normalize(model.head(fmap[1, :, 2:6, 2:6].mean((1, 2))[None]), dim=1)
    torch.testing.assert_close(out[1], expected_mid, rtol=1e-4, atol=1e-5)


def grouped_reference(x, weight, bias, eps, groups, seed):
    """Shuffle BN on one device, from its description: the permutation ``torch.randperm(B)``
    drawn after ``torch.manual_seed(seed)``; sample i of the permuted batch in group i % groups,
    each group normalised with its own batch statistics; then back to the original order."""
    torch.manual_seed(seed)
    perm = torch.randperm(x.shape[0])
    shuffled = x[perm]
    out = torch.empty_like(shuffled)
    for g in range(groups):
        position = torch.arange(g, x.shape[0], groups)
        out[position] = F.batch_norm(shuffled[position], None, None, weight, bias, training=True, eps=eps)
    restored = torch.empty_like(out)
    restored[perm] = out  # row perm[i] of x was processed at position i
    return restored


@pytest.mark.parametrize("batch, groups", [(8, 2), (12, 4)])
def test_shuffled_keys_are_normalised_within_interleaved_groups_of_the_permuted_batch(batch, groups):
    # Bugs caught: groups taken from the unshuffled batch or as contiguous blocks, the
    # permutation applied instead of its inverse on the way back, statistics over the whole batch.
    model = small_model(groups=groups)
    bn = GroupedBatchNorm2d(3)
    bn.groups = groups
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    model.key_encoder = torch.nn.Sequential(bn, torch.nn.Flatten())  # key = normalize(flat(BN(x)))
    model.key_head = torch.nn.Identity()
    x = torch.randn(batch, 3, 2, 2) * 2 + torch.arange(batch, dtype=torch.float)[:, None, None, None]
    seed = 11
    expected = F.normalize(grouped_reference(x, bn.weight.detach(), bn.bias.detach(), bn.eps, groups, seed).flatten(1),
                           dim=1)
    torch.manual_seed(seed)
    keys = model.encode_keys(x)
    torch.testing.assert_close(keys, expected, rtol=1e-5, atol=1e-5)
    # the reference itself is sensitive to the permutation: another seed gives other keys
    other = F.normalize(grouped_reference(x, bn.weight.detach(), bn.bias.detach(), bn.eps, groups, seed + 1).flatten(1),
                        dim=1)
    assert (keys - other).abs().max() > 1e-2


def test_key_encoder_batchnorm_is_grouped_in_training():
    # Bug caught: the key encoder's BatchNorm layers left ungrouped (the groups setting ignored).
    x = torch.randn(8, 3, 32, 32)
    keys = {}
    for groups in (1, 2):
        model = small_model(groups=groups).train()  # same weights for both (seeded)
        torch.manual_seed(5)  # same permutation for both
        keys[groups] = model.encode_keys(x)
        torch.testing.assert_close(keys[groups].norm(dim=1), torch.ones(8))
    assert (keys[1] - keys[2]).abs().max() > 1e-3


def test_grouped_affine_gives_the_per_layer_repeats_bit_for_bit():
    # Bugs caught: a layer handed another layer's (or another width's) weight or bias, the
    # repeats of one batch size kept for the next, the cache left behind after the forward.
    from dscl.models.momentum import grouped_affine

    model = small_model(groups=4).train()
    with torch.no_grad():
        for p in model.key_encoder.parameters():
            p.uniform_(-1.0, 1.0)
    for batch in (8, 6):  # 4 groups, then 3
        x = torch.randn(batch, 3, 32, 32)
        plain = model.key_features(x)  # each layer repeats its own weight and bias
        with grouped_affine(model.key_encoder, batch):
            cached = model.key_features(x)
        assert torch.equal(cached, plain)
    assert all(getattr(m, "repeated", None) is None for m in model.key_encoder.modules())


def _buffers(model):
    return {name: b.clone() for name, b in model.named_buffers()}


@pytest.mark.parametrize("frozen_early", [False, True])
def test_counted_once_moves_every_counter_as_the_per_layer_increments_do(monkeypatch, frozen_early):
    # Bugs caught: a counter moved twice, or moved where the layer did not count (the patch pass,
    # the key encoder, layers in eval mode, a layer whose momentum is None and reads its count),
    # a counter left as None after the forward, counters moved by a forward that failed.
    def one_step(model):
        torch.manual_seed(1)
        out = model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), torch.randn(4, 2, 3, 16, 16),
                    torch.tensor([[[0.0, 0.0, 16.0, 16.0], [8.0, 8.0, 24.0, 24.0]]] * 4))
        return out.query, _buffers(model)

    model = small_model().train()
    model.encoder.bn1.momentum = None  # a cumulative average: its forward reads the counter
    if frozen_early:
        model.encoder.freeze_early_stages()
    reference = copy.deepcopy(model)
    query, buffers = one_step(model)
    monkeypatch.setattr(momentum, "counted_once", lambda module: contextlib.nullcontext())
    query_ref, buffers_ref = one_step(reference)
    assert torch.equal(query, query_ref)
    assert buffers.keys() == buffers_ref.keys()
    assert all(torch.equal(buffers[name], buffers_ref[name]) for name in buffers)
    assert int(buffers["encoder.layer3.0.bn1.num_batches_tracked"]) == 1
    assert int(buffers["encoder.layer1.0.bn1.num_batches_tracked"]) == (0 if frozen_early else 1)

    monkeypatch.undo()
    with pytest.raises(RuntimeError), momentum.counted_once(model.encoder):
        model.encoder(torch.randn(4, 5, 32, 32))  # wrong channel count: fails inside the pass
    assert all(torch.equal(b, buffers[name]) for name, b in _buffers(model).items())
