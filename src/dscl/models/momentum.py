"""The stage-1 model: query encoder and head, momentum key encoder, labelled queue, patch features.

One forward computes, for a batch of B images with L patches each::

    z = normalize(g(f(g1)))                       # (B, D)    query features, with gradient
    k = normalize(g_k(f_k(g2)))                   # (B, D)    keys, momentum encoder, no gradient
    c = normalize(g(mean_2x2(roi_align(u, box)))) # (B, L, D) patch teacher, no gradient
    s = normalize(g(f(crop)))                     # (B, L, D) patch student, all B*L crops at once

The losses are computed by the caller (``dscl.losses``), who then steps the optimiser and
hands the keys back: ``model.enqueue(keys, labels)``.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from .backbones import Backbone
from .heads import ProjectionHead
from .queue import ClassBalancedQueue, LabelledQueue


class GroupedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics are computed within ``groups`` interleaved groups.

    The single-device stand-in for MoCo's shuffle BN: the key batch is permuted at random, so
    sample i of the permuted batch lands in group i % groups; each group is normalised on its
    own, so a key's statistics do not come from the same samples as its query's. Viewing
    (B, C, H, W) as (B/G, G*C, H, W) puts each group in its own channels, so the native kernel
    does the work. Same parameters and buffers as ``nn.BatchNorm2d`` (the EMA maps one to one).
    """

    groups: int = 1
    repeated: tuple[Tensor, Tensor] | None = None  # weight and bias repeated per group, set by grouped_affine

    def forward(self, x: Tensor) -> Tensor:
        groups = _largest_divisor(x.shape[0], self.groups)
        if not self.training or groups == 1:
            return super().forward(x)
        b, c, h, w = x.shape
        weight, bias = self.repeated or (self.weight.repeat(groups), self.bias.repeat(groups))
        out = F.batch_norm(x.reshape(b // groups, groups * c, h, w), None, None, weight, bias, True, 0.0, self.eps)
        return out.reshape(b, c, h, w)


def _largest_divisor(n: int, at_most: int) -> int:
    return next(g for g in range(min(n, at_most), 0, -1) if n % g == 0)


@contextlib.contextmanager
def grouped_affine(module: nn.Module, batch: int):
    """For a training forward of ``batch`` samples: every grouped BatchNorm's weight and bias
    repeated per group once, in two operators per channel count (stack, repeat), rather than two
    repeats per layer. The same values, so the same outputs."""
    norms = [m for m in module.modules() if isinstance(m, GroupedBatchNorm2d) and m.training and m.affine]
    by_width: dict[int, list[GroupedBatchNorm2d]] = {}
    for m in norms:
        by_width.setdefault(m.num_features, []).append(m)
    for width in by_width.values():
        groups = _largest_divisor(batch, width[0].groups)
        rows = torch.stack([p for m in width for p in (m.weight, m.bias)]).repeat(1, groups)
        for i, m in enumerate(width):
            m.repeated = (rows[2 * i], rows[2 * i + 1])
    try:
        yield
    finally:
        for m in norms:
            m.repeated = None


def _group_batchnorms(module: nn.Module, groups: int) -> None:
    for m in module.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = GroupedBatchNorm2d
            m.groups = groups


@dataclass
class ContrastOutput:
    query: Tensor  # (B, D)
    key: Tensor  # (B, D)
    teacher: Tensor | None  # (B, L, D); None without patches or without a teacher
    student: Tensor | None  # (B, L, D)


class MomentumContrast(nn.Module):
    """Query encoder ``f, g``, momentum key encoder ``f_k, g_k`` and the labelled queue.

    Written for heads that each project their own feature map of the encoder: here the one head
    ``g`` on the one map ``u``; :class:`dscl.models.experts.MultiExpertContrast` overrides the
    few methods that make them E (E maps, heads and queues, one output per expert).
    """

    head_name = "head"  # the query head's attribute, "key_" + it the momentum copy's (their state-dict keys)

    def __init__(self, backbone: Backbone, *, feature_dim: int = 128, queue_size: int = 65536,
                 momentum: float = 0.999, key_bn_groups: int = 8, patch_bn_stats: bool = False,
                 num_classes: int | None = None, teacher: str | None = "roi"):
        super().__init__()
        self.encoder = backbone
        self.add_module(self.head_name, self.new_head(feature_dim))
        self.key_encoder = copy.deepcopy(backbone)
        self.add_module("key_" + self.head_name, copy.deepcopy(getattr(self, self.head_name)))
        _group_batchnorms(self.key_encoder, key_bn_groups)
        for p in [*self.key_encoder.parameters(), *self._head_parameters(key=True)]:
            p.requires_grad_(False)
        self.queue = self.new_queue(queue_size, feature_dim, num_classes)
        self.momentum = momentum
        # The patch crops' teacher: "roi" (PBSD, Eq. 11), "global" (the anchor's own z_i, the
        # `*` ablation) or None (no teacher: the crops only enter the contrastive loss)
        self.teacher = teacher
        # The patch crops are normalised with their own batch statistics either way; by default
        # they stay out of the running statistics, which stage 2 and evaluation use on full-size
        # images (with 5 crops per image they would otherwise make up most of the updates).
        self.patch_bn_stats = patch_bn_stats

    def new_head(self, feature_dim: int) -> nn.Module:
        return ProjectionHead(self.encoder.out_dim, feature_dim)

    def new_queue(self, size: int, dim: int, num_classes: int | None) -> nn.Module:
        """num_classes given: the class-balanced queue of the ablations, else one FIFO."""
        return LabelledQueue(size, dim) if num_classes is None else ClassBalancedQueue(size, dim, num_classes)

    def _heads(self, key: bool = False) -> list[nn.Module]:
        """The query heads, one per feature map (``key``: their momentum copies)."""
        return [self.key_head if key else self.head]

    def feature_maps(self, encoder: Backbone, x: Tensor) -> list[Tensor]:
        """(N, 3, S, S) -> the feature maps (N, C, h, w) the heads project, one per head."""
        return [encoder.forward_features(x)]

    def _per_head(self, values: list):
        """What the model returns of values computed per head: the one value here, the list for experts."""
        return values[0]

    def _project(self, maps: list[Tensor], key: bool = False) -> list[Tensor]:
        """Feature maps (N, C, h, w) -> normalised projections (N, D), map e by head e (``key``: its momentum copy)."""
        return [F.normalize(g(u.mean((2, 3))), dim=1) for g, u in zip(self._heads(key), maps)]

    def _head_parameters(self, key: bool = False) -> list[nn.Parameter]:
        return [p for g in self._heads(key) for p in g.parameters()]

    def query_pairs(self):
        return zip([*self.encoder.parameters(), *self._head_parameters()],
                   [*self.key_encoder.parameters(), *self._head_parameters(key=True)])

    def momentum_update(self) -> None:
        momentum_update(self.query_pairs(), self.momentum)

    @torch.no_grad()
    def enqueue(self, keys: Tensor, labels: Tensor) -> None:
        """A step's keys (of all ranks) and their labels into the queue, after the optimiser's step (MoCo)."""
        self.queue.enqueue(keys, labels)

    @torch.no_grad()
    def encode_keys(self, key_view: Tensor) -> Tensor:
        """(B, 3, S, S) -> (B, D) normalised keys; batch shuffled (across ranks when distributed)."""
        x, unshuffle = _shuffle(key_view)
        with grouped_affine(self.key_encoder, x.shape[0]):
            return unshuffle(self.key_features(x))

    def key_features(self, x: Tensor) -> Tensor:
        """(B, 3, S, S) -> (B, D) normalised keys of the momentum encoder, in the batch's order."""
        return F.normalize(self.key_head(self.key_encoder(x)), dim=1)

    def forward(self, query_view: Tensor, key_view: Tensor, patches: Tensor | None = None,
                boxes: Tensor | None = None) -> ContrastOutput:
        """query_view, key_view: (B, 3, S, S); patches: (B, L, 3, P, P); boxes: (B, L, 4) in g1 pixels."""
        with counted_once(self.encoder):
            maps = self.feature_maps(self.encoder, query_view)  # u: (B, C, h, w), one per head
        queries = self._project(maps)
        with torch.no_grad():
            self.momentum_update()
            keys = _as_list(self.encode_keys(key_view))
        teachers = students = [None] * len(maps)
        if patches is not None:
            b, num_patches = patches.shape[:2]
            with torch.no_grad():
                if self.teacher == "roi":
                    teachers = [self.patch_teacher(u.detach(), boxes, g) for u, g in zip(maps, self._heads())]
                elif self.teacher == "global":
                    teachers = [q.detach()[:, None, :].expand(b, num_patches, q.shape[1]) for q in queries]
            with contextlib.nullcontext() if self.patch_bn_stats else frozen_running_stats(self.encoder):
                students = _as_list(self.student_features(patches))
        return self._per_head([ContrastOutput(*parts) for parts in zip(queries, keys, teachers, students)])

    def student_features(self, patches: Tensor) -> Tensor:
        """Eq. 13: (B, L, 3, P, P) crops -> (B, L, D) normalised features, all B*L crops in one
        forward (the authors run one forward per crop index; ``dscl bench --reference`` times that)."""
        b, num_patches = patches.shape[:2]
        maps = self.feature_maps(self.encoder, patches.flatten(0, 1))  # of the (B*L, 3, P, P) crops
        return self._per_head([s.view(b, num_patches, -1) for s in self._project(maps)])

    def patch_teacher(self, feature_map: Tensor, boxes: Tensor, head: nn.Module | None = None) -> Tensor:
        """Eq. 11: ROI-align each box on u (2x2 output), average, project by ``head`` (default: the
        query head), normalise -> (B, L, D)."""
        b, num_patches = boxes.shape[:2]
        pooled = roi_align(feature_map, list(boxes.to(feature_map.dtype).unbind(0)), output_size=2,
                           spatial_scale=1.0 / self.encoder.stride, sampling_ratio=2, aligned=True)
        return F.normalize((self.head if head is None else head)(pooled.mean((2, 3))), dim=1).view(b, num_patches, -1)


def _as_list(values) -> list:
    """A model's per-head result as a list: the experts' list as it is, a single model's value as a list of one."""
    return values if isinstance(values, list) else [values]


@torch.no_grad()
def momentum_update(pairs, momentum: float) -> None:
    """theta_k <- m * theta_k + (1 - m) * theta_q over (query, key) parameter pairs; parameters
    only (BN buffers untouched)."""
    query, key = zip(*pairs)
    torch._foreach_lerp_(list(key), list(query), 1.0 - momentum)


@contextlib.contextmanager
def frozen_running_stats(module: nn.Module):
    """BatchNorm layers still normalise with batch statistics but leave their running mean,
    variance and batch count as they are: for the duration they do not track them, so their
    forward is the one batch-norm kernel, without the count's increment (one operator per layer
    fewer than momentum 0, same outputs and statistics)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with _attribute_set(norms, "track_running_stats", False):
        yield


@contextlib.contextmanager
def counted_once(module: nn.Module):
    """For a training forward in which every BatchNorm of ``module`` runs once (one pass of an
    encoder): their batch counters (``num_batches_tracked``) move by one in a single operator
    after it rather than one operator per layer (a kernel launch each on a GPU); the same
    counts. Layers with ``momentum=None`` keep their own, their forward reads it."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
             and m.track_running_stats and m.momentum is not None and m.num_batches_tracked is not None]
    if not norms or torch.compiler.is_compiling():  # a compiled step fuses the increments anyway
        yield
        return
    with _attribute_set(norms, "num_batches_tracked", None) as counters:
        yield
    torch._foreach_add_(counters, 1)  # not reached when the pass raised


@contextlib.contextmanager
def _attribute_set(modules: list, name: str, value):
    """Sets ``name`` to ``value`` on every module for the duration; yields the values it
    replaced and puts them back afterwards, also on an error."""
    saved = [getattr(m, name) for m in modules]
    for m in modules:
        setattr(m, name, value)
    try:
        yield saved
    finally:
        for m, old in zip(modules, saved):
            setattr(m, name, old)


def _shuffle(x: Tensor):
    """Random permutation of the batch; across all ranks when running distributed (MoCo)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        perm = torch.randperm(x.shape[0], device=x.device)
        inverse = torch.argsort(perm)
        return x[perm], lambda y: y[inverse]
    world, rank, local = dist.get_world_size(), dist.get_rank(), x.shape[0]
    gathered = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(gathered, x.contiguous())
    full = torch.cat(gathered)
    perm = torch.randperm(full.shape[0], device=x.device)
    dist.broadcast(perm, src=0)
    inverse = torch.argsort(perm)
    mine = perm.view(world, local)[rank]

    def unshuffle(y: Tensor) -> Tensor:
        parts = [torch.empty_like(y) for _ in range(world)]
        dist.all_gather(parts, y.contiguous())
        return torch.cat(parts)[inverse].view(world, local, -1)[rank]

    return full[mine], unshuffle
