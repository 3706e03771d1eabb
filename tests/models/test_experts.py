"""The RIDE-style multi-expert backbone and the models of both stages on it (docs/RECIPES.md)."""

import functools

import pytest
import torch
import torch.nn.functional as F

from dscl.bench import per_index_students
from dscl.config import load_config
from dscl.engine.experts import classifier_loss
from dscl.engine.pretrain import build_stage1_model, stage1_losses
from dscl.errors import ConfigError
from dscl.losses import decoupled_supcon_loss, patch_distillation_loss
from dscl.models import (ExpertClassifier, MomentumContrast, MultiExpertBackbone, MultiExpertContrast,
                         build_backbone, build_classifier, build_multi_expert_backbone)

BASE = ["method=dscl+pbsd", "pretrain.batch_size=4", "pretrain.queue_size=16", "pretrain.num_patches=2",
        "pretrain.key_bn_groups=2", "model.feature_dim=16", "model.experts=3"]


def batch(b=4, size=32, patch=16, num=2):
    g = torch.Generator().manual_seed(0)
    views = (torch.randn(b, 3, size, size, generator=g), torch.randn(b, 3, size, size, generator=g),
             torch.randn(b, num, 3, patch, patch, generator=g),
             torch.tensor([[0.0, 0.0, 16.0, 16.0], [8.0, 4.0, 30.0, 28.0]]).expand(b, num, 4).contiguous())
    return views, torch.tensor([0, 1, 1, 2])


def test_resnet32_experts_share_layer2_and_narrow_layer3():
    torch.manual_seed(0)
    net = build_multi_expert_backbone("resnet32", 3)
    maps = net.expert_maps(torch.randn(2, 3, 32, 32))
    assert net.num_experts == 3 and net.expert_dim == 48 and net.out_dim == 144 and net.stride == 4
    assert [m.shape for m in maps] == [(2, 48, 8, 8)] * 3
    assert not torch.equal(maps[0], maps[1])  # each expert its own initialisation
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 144)  # a 16-px patch crop pools to one vector per expert
    assert net.shared(torch.randn(1, 3, 32, 32)).shape == (1, 32, 16, 16)  # conv1, layer1, layer2 shared
    assert sum(p.numel() for p in net.parameters()) > sum(p.numel() for p in build_backbone("resnet32").parameters())


def test_resnet50_experts_have_ride_widths():
    net = build_multi_expert_backbone("resnet50", 3)
    layer3, layer4 = net.experts[0]
    assert layer3[0].conv1.out_channels == 192 and layer4[0].conv1.out_channels == 384
    assert net.expert_dim == 1536 and net.out_dim == 3 * 1536 and net.stride == 32
    assert all(not block.bn3.weight.detach().any() for block in layer4)  # zero-init of the last BN gamma
    assert net.expert_maps(torch.randn(1, 3, 64, 64))[2].shape == (1, 1536, 2, 2)


def test_experts_1_builds_the_single_model():
    cfg = load_config(None, [o for o in BASE if not o.startswith("model.experts")] + ["model.experts=1"])
    torch.manual_seed(0)
    one = build_stage1_model(cfg, 3)
    torch.manual_seed(0)
    default = build_stage1_model(load_config(None, [o for o in BASE if not o.startswith("model.experts")]), 3)
    assert type(one) is MomentumContrast
    assert one.state_dict().keys() == default.state_dict().keys()
    assert all(torch.equal(v, default.state_dict()[k]) for k, v in one.state_dict().items())


def test_shared_stages_run_once_per_view_whatever_the_number_of_experts():
    cfg = load_config(None, BASE)
    torch.manual_seed(0)
    model = build_stage1_model(cfg, 3)
    assert isinstance(model, MultiExpertContrast) and len(model.queue) == 3 and len(model.key_heads) == 3
    calls = {"query": 0, "key": 0}
    model.encoder.shared.register_forward_hook(lambda *_: calls.__setitem__("query", calls["query"] + 1))
    model.key_encoder.shared.register_forward_hook(lambda *_: calls.__setitem__("key", calls["key"] + 1))
    outs = model(*batch()[0])
    assert len(outs) == 3 and calls == {"query": 2, "key": 1}  # query view + all crops at once; key view
    assert all(o.query.shape == (4, 16) and o.student.shape == (4, 2, 16) and o.teacher.shape == (4, 2, 16)
               for o in outs)


def test_each_experts_teacher_comes_from_its_own_feature_map_and_head():
    cfg = load_config(None, BASE)
    torch.manual_seed(0)
    model = build_stage1_model(cfg, 3)
    (query_view, key_view, patches, boxes), _ = batch()
    torch.manual_seed(1)
    outs = model(query_view, key_view, patches, boxes)
    with torch.no_grad():
        maps = model.encoder.expert_maps(query_view)
        for e in range(3):
            torch.testing.assert_close(outs[e].teacher, model.patch_teacher(maps[e], boxes, model.heads[e]))
            torch.testing.assert_close(outs[e].query, F.normalize(model.heads[e](maps[e].mean((2, 3))), dim=1))
        assert not torch.allclose(outs[0].teacher, model.patch_teacher(maps[1], boxes, model.heads[1]))


def test_batched_crops_equal_one_forward_per_patch():
    cfg = load_config(None, BASE)
    torch.manual_seed(0)
    model = build_stage1_model(cfg, 3).eval()  # BatchNorm on running statistics: crops batched or not alike
    batched = model(*batch()[0])
    model.student_features = functools.partial(per_index_students, model)  # one forward per crop index
    reference = model(*batch()[0])
    for a, b in zip(batched, reference):
        torch.testing.assert_close(a.student, b.student, atol=1e-5, rtol=1e-4)


def test_stage1_loss_is_the_mean_of_each_experts_loss_with_its_own_queue():
    cfg = load_config(None, BASE)
    torch.manual_seed(0)
    model = build_stage1_model(cfg, 3)
    g = torch.Generator().manual_seed(3)
    model.queue.enqueue(F.normalize(torch.randn(10, 3, 16, generator=g), dim=2),
                        torch.randint(0, 3, (10,), generator=g))
    assert not torch.equal(model.queue[0].keys, model.queue[1].keys) and model.queue.num_valid() == 10
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(2)
    loss, parts, keys = stage1_losses(model, batch(), cfg, torch.device("cpu"))
    loss.backward()
    assert all(h.net[0].weight.grad is not None for h in model.heads)
    model.load_state_dict(state)
    torch.manual_seed(2)
    outs = model(*batch()[0])
    labels = batch()[1]
    expected = []
    for e, out in enumerate(outs):
        q = model.queue[e]
        contrast = decoupled_supcon_loss(out.query, out.key, labels, q.keys, q.labels,
                                         alpha=cfg.alpha, temperature=0.07)
        distill = patch_distillation_loss(out.teacher, out.student, out.key, q.keys, q.labels, temperature=0.07)
        expected.append(contrast + 1.5 * distill)
        torch.testing.assert_close(parts[f"loss_e{e}"], expected[-1])
    torch.testing.assert_close(loss, torch.stack(expected).mean())
    assert keys.shape == (4, 3, 16) and not any(name.startswith("_") for name in parts)
    torch.testing.assert_close(keys[:, 2], outs[2].key)


def test_ema_and_queues_are_per_expert():
    cfg = load_config(None, BASE + ["pretrain.ema_momentum=0.5"])
    torch.manual_seed(0)
    model = build_stage1_model(cfg, 3)
    with torch.no_grad():
        for p in model.heads[1].parameters():
            p.add_(1.0)
    before = [h.net[0].weight.clone() for h in model.key_heads]
    model.momentum_update()
    assert torch.equal(model.key_heads[0].net[0].weight, before[0])
    torch.testing.assert_close(model.key_heads[1].net[0].weight, 0.5 * before[1] + 0.5 * model.heads[1].net[0].weight)
    keys = F.normalize(torch.randn(4, 3, 16), dim=2)
    model.queue.enqueue(keys, torch.tensor([0, 1, 2, 0]))
    for e in range(3):
        torch.testing.assert_close(model.queue[e].keys[:4], keys[:, e])


def test_stage2_classifier_is_the_mean_of_per_expert_standardised_linear_layers():
    torch.manual_seed(0)
    backbone = build_multi_expert_backbone("resnet32", 3)
    model = build_classifier(backbone, 5)
    assert isinstance(model, ExpertClassifier) and isinstance(model.backbone, MultiExpertBackbone)
    features = torch.cat([torch.randn(40, 48) * s + s for s in (1.0, 5.0, 0.2)], 1)  # (40, 144)
    model.norm.fit(features)
    for e, part in enumerate(features.chunk(3, 1)):  # each expert standardised by its own statistics
        torch.testing.assert_close(model.norm.experts[e].mean, part.mean(0))
    logits = model.expert_logits(features)
    assert logits.shape == (40, 3, 5)
    part = (features[:, 48:96] - model.norm.experts[1].mean) / model.norm.experts[1].std
    torch.testing.assert_close(logits[:, 1], model.fc.linears[1](part))
    torch.testing.assert_close(model.head(features), logits.mean(1))
    labels = torch.randint(0, 5, (40,))
    torch.testing.assert_close(classifier_loss(logits, labels),
                               sum(F.cross_entropy(logits[:, e], labels) for e in range(3)))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), model.head(backbone(images)))


@pytest.mark.parametrize("override, words", [
    ("model.experts=0", "model.experts: must be >= 1"),
    ("model.expert_width=0", "model.expert_width: must be > 0"),
    ("method=ce", "model.experts: needs a contrastive method"),
])
def test_bad_expert_settings_are_refused_naming_the_key(override, words):
    with pytest.raises(ConfigError, match=words):
        load_config(None, BASE + [override])
