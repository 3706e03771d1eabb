"""The ablation variants (docs/ABLATIONS.md): each changes only the part of the loss inputs it names.

Every test builds the base method and one variant from the same seed, feeds both the same batch
and the same queue contents, records what reaches the loss functions, and checks that exactly
the named tensors differ.
"""

import pytest
import torch
import torch.nn.functional as F

from dscl.config import load_config
from dscl.data import batched
from dscl.data.longtail import longtail_counts
from dscl.engine.pretrain import anchor_weights, build_stage1_model, stage1_losses
from dscl.errors import ConfigError
from dscl.losses import decoupled_supcon_loss, effective_number_weights, patch_distillation_loss

COUNTS = [40, 12, 4]  # training images per class of the constructed case
BASE = ["method=dscl+pbsd", "pretrain.batch_size=6", "pretrain.queue_size=24", "pretrain.num_patches=2",
        "pretrain.key_bn_groups=1"]


def batch(seed=0, b=6, size=32, patch=16, num=2):
    g = torch.Generator().manual_seed(seed)
    views = (torch.randn(b, 3, size, size, generator=g), torch.randn(b, 3, size, size, generator=g),
             torch.randn(b, num, 3, patch, patch, generator=g),
             torch.tensor([[0.0, 0.0, 16.0, 16.0], [8.0, 4.0, 30.0, 28.0]]).expand(b, num, 4).contiguous())
    return views, torch.tensor([0, 0, 1, 2, 0, 1])


def record(overrides):
    """What each loss function receives for one batch, after the same 20 keys were enqueued."""
    cfg = load_config(None, BASE + overrides)
    torch.manual_seed(0)
    model = build_stage1_model(cfg, num_classes=len(COUNTS))
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([0] * 14 + [1] * 3 + [2] * 3)[torch.randperm(20, generator=g)]
    model.queue.enqueue(F.normalize(torch.randn(20, 128, generator=g), dim=1), labels)
    calls = []

    def recorder(name, fn):
        def call(*args, **kwargs):
            calls.append((name, [a.detach().clone() if torch.is_tensor(a) else a for a in args],
                          {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()
                           if k != "signals"}))  # the dict the loss fills, not an input
            return fn(*args, **kwargs)
        return call

    torch.manual_seed(2)  # the key shuffle
    stage1_losses(model, batch(), cfg, torch.device("cpu"), supcon=recorder("supcon", decoupled_supcon_loss),
                  pbsd=recorder("pbsd", patch_distillation_loss), class_weight=anchor_weights(cfg, COUNTS))
    return calls


def same(a, b) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)
    return a == b


def differing(call_a, call_b) -> set:
    """Positions (int) and keyword names whose values differ between two calls of one function."""
    (_, args_a, kw_a), (_, args_b, kw_b) = call_a, call_b
    out = {n for n, (x, y) in enumerate(zip(args_a, args_b)) if not same(x, y)}
    return out | {k for k in set(kw_a) | set(kw_b) if not same(kw_a.get(k), kw_b.get(k))}


# positions of the loss functions' arguments
QUERY, KEY, LABELS, QUEUE, QUEUE_LABELS = 0, 1, 2, 3, 4
TEACHER, STUDENT, PBSD_KEY, PBSD_QUEUE, PBSD_QUEUE_LABELS = 0, 1, 2, 3, 4


def test_base_is_one_contrastive_and_one_distillation_call():
    calls = record([])
    assert [c[0] for c in calls] == ["supcon", "pbsd"]
    assert calls[0][2]["weight"] is None


def test_global_teacher_changes_only_the_teacher_and_it_is_the_anchor_feature():
    base, variant = record([]), record(["pretrain.pbsd_teacher=global"])
    assert [c[0] for c in variant] == ["supcon", "pbsd"]
    assert differing(base[0], variant[0]) == set()
    assert differing(base[1], variant[1]) == {TEACHER}
    teacher, query = variant[1][1][TEACHER], variant[0][1][QUERY]  # (B, L, D), (B, D)
    assert torch.equal(teacher, query[:, None, :].expand_as(teacher))


def test_multicrop_turns_the_crops_into_contrastive_anchors_with_their_images_keys():
    base, variant = record([]), record(["pretrain.patch_mode=multicrop"])
    assert [c[0] for c in variant] == ["supcon", "supcon", "supcon"]  # global + one per crop index
    assert differing(base[0], variant[0]) == set()
    student = base[1][1][STUDENT]  # (B, L, D): the same crop features PBSD distils
    for j, call in enumerate(variant[1:]):
        assert differing(base[0], call) == {QUERY}
        assert torch.equal(call[1][QUERY], student[:, j])


def test_balanced_queue_changes_only_the_queue_and_keeps_per_class_slots():
    base, variant = record([]), record(["pretrain.queue_sampling=balanced"])
    assert differing(base[0], variant[0]) == {QUEUE, QUEUE_LABELS}
    assert differing(base[1], variant[1]) == {PBSD_QUEUE, PBSD_QUEUE_LABELS}
    fifo_labels, balanced_labels = base[0][1][QUEUE_LABELS], variant[0][1][QUEUE_LABELS]
    # 20 keys (14 / 3 / 3) into 24 slots: the FIFO keeps them all; 8 slots per class keep the newest 8 of class 0
    assert torch.bincount(fifo_labels[fifo_labels >= 0]).tolist() == [14, 3, 3]
    assert torch.bincount(balanced_labels[balanced_labels >= 0]).tolist() == [8, 3, 3]
    assert all(int(v) in (c, -1) for c in range(3) for v in balanced_labels[c * 8 : (c + 1) * 8])


def test_balanced_queue_keeps_the_newest_keys_of_each_class():
    cfg = load_config(None, BASE + ["pretrain.queue_sampling=balanced", "pretrain.queue_size=6"])
    queue = build_stage1_model(cfg, num_classes=3).queue  # 2 slots per class
    keys = torch.arange(7.0)[:, None].expand(7, 128)
    queue.enqueue(keys[:4], torch.tensor([0, 1, 0, 0]))
    queue.enqueue(keys[4:], torch.tensor([0, 2, 1]))
    kept = {c: sorted(queue.keys[queue.labels == c, 0].tolist()) for c in range(3)}
    assert kept == {0: [3.0, 4.0], 1: [1.0, 6.0], 2: [5.0]}


def test_reweighting_changes_only_the_anchor_weights_and_they_follow_the_class():
    base, variant = record([]), record(["pretrain.reweight=effective_number"])
    assert differing(base[0], variant[0]) == {"weight"}
    assert differing(base[1], variant[1]) == set()  # the distillation term is not re-weighted
    labels = variant[0][1][LABELS]
    torch.testing.assert_close(variant[0][2]["weight"], effective_number_weights(torch.tensor(COUNTS))[labels])


def test_full_image_patch_scale_changes_only_the_patches():
    views = {}
    for scale in ((0.05, 0.6), (1.0, 1.0)):
        transform = batched.BatchedViewPatch(32, 16, num_patches=3, patch_scale=scale, mean=(0.5,) * 3, std=(0.5,) * 3)
        images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        views[scale] = transform(images, generator=torch.Generator().manual_seed(1))
    (q0, k0, p0, b0), (q1, k1, p1, b1) = views[(0.05, 0.6)], views[(1.0, 1.0)]
    assert torch.equal(q0, q1) and torch.equal(k0, k1)
    assert not torch.equal(p0, p1) and not torch.equal(b0, b1)
    assert torch.equal(b1, torch.tensor([0.0, 0.0, 32.0, 32.0]).expand_as(b1))


def test_pareto_profile_has_the_same_head_and_tail_and_follows_a_power_law():
    exponential, pareto = longtail_counts(5000, 10, 100), longtail_counts(5000, 10, 100, "pareto")
    assert pareto[0] == exponential[0] == 5000 and pareto[-1] == exponential[-1] == 50
    assert pareto == [int(5000 * (c + 1) ** -2.0 + 1e-9) for c in range(10)]  # log 100 / log 10 = 2
    assert pareto[1] < exponential[1] and sum(pareto) < sum(exponential)


def test_pareto_profile_reaches_the_training_split():
    common = ["data.synthetic_classes=5", "data.synthetic_n_max=60", "data.imbalance_ratio=10"]
    from dscl.engine.runner import load_data

    counts = load_data(load_config(None, common + ["data.profile=pareto"])).train_counts
    assert counts == longtail_counts(60, 5, 10, "pareto") != longtail_counts(60, 5, 10)


@pytest.mark.parametrize("override, key", [
    ("pretrain.alpha=1.5", "pretrain.alpha"),
    ("pretrain.num_patches=0", "pretrain.num_patches"),
    ("pretrain.pbsd_weight=-0.5", "pretrain.pbsd_weight"),
    ("pretrain.pbsd_teacher=patch", "pretrain.pbsd_teacher"),
    ("pretrain.patch_mode=multi-crop", "pretrain.patch_mode"),
    ("pretrain.queue_sampling=uniform", "pretrain.queue_sampling"),
    ("pretrain.reweight=focal", "pretrain.reweight"),
    ("data.profile=zipf", "data.profile"),
    ("pretrain.patch_scale=[0.0,1.0]", "pretrain.patch_scale"),
])
def test_bad_variant_values_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_patch_variants_need_a_method_with_patches():
    with pytest.raises(ConfigError, match="pbsd_teacher"):
        load_config(None, ["method=dscl", "pretrain.patch_mode=multicrop"])
