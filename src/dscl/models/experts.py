"""A RIDE-style multi-expert backbone (Wang et al., ICLR 2021) and the models of both stages on it.

The early stages run once and are shared; each of E experts has its own, narrower copy of the
last stage(s) and so its own feature map::

    shared = f_0(x)                        # (B, C0, H, W)   once per view
    u_e    = f_e(shared)                   # (B, c, h, w)    expert e = 0 .. E-1
    v_e    = mean_hw(u_e)                  # (B, c)          global (adaptive) average pool

Which stages are copied and how wide they are is this project's choice where the paper is
silent (docs/RECIPES.md, "Multi-expert backbone"): ResNet-32 shares conv1, layer1, layer2 and
copies layer3 (64 * width channels: 48 for RIDE's 3/4); the torchvision ResNets share the stem,
layer1, layer2 and copy layer3 and layer4 (planes 256 * width and 512 * width: 192 / 384, as in
RIDE's ResNet-50). Experts are freshly initialised; pretrained weights reach the shared stages.

Stage 1 (:class:`MultiExpertContrast`) gives every expert its own projection head, momentum copy
and labelled queue; stage 2 (:class:`ExpertClassifier`) a feature standardiser and linear layer
per expert, and predicts the mean of the experts' logits.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.ops import roi_align

from .backbones import Backbone, CifarResNet, TorchvisionResNet, _CifarBlock, build_backbone
from .heads import Classifier, FeatureStandardizer, ProjectionHead
from .momentum import ContrastOutput, _group_batchnorms, _shuffle, frozen_running_stats, momentum_update
from .queue import ClassBalancedQueue, LabelledQueue


class MultiExpertBackbone(Backbone):
    """Shared early stages and E expert branches of equal width.

    ``forward_features`` is the experts' feature maps side by side, (B, E*c, h, w), and
    ``forward`` their pooled features side by side, (B, E*c); ``out_dim`` is E*c and
    ``expert_dim`` c. ``expert_maps`` gives each expert's map with the shared stages run once.
    """

    def __init__(self, shared: nn.Module, experts: Sequence[nn.Module], expert_dim: int, stride: int):
        super().__init__()
        self.shared = shared
        self.experts = nn.ModuleList(experts)
        self.expert_dim, self.stride = expert_dim, stride
        self.out_dim = expert_dim * len(self.experts)

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def expert_maps(self, x: Tensor) -> list[Tensor]:
        """(B, 3, S, S) -> E feature maps (B, c, h, w); the shared stages run once."""
        shared = self.shared(x)
        return [expert(shared) for expert in self.experts]

    def forward_features(self, x: Tensor) -> Tensor:
        return torch.cat(self.expert_maps(x), 1)  # (B, E*c, h, w)

    def last_stage(self) -> nn.Module:
        return self.experts  # train_last_stage_only: every expert branch (none has pretrained weights)


def build_multi_expert_backbone(name: str, experts: int, *, width: float = 0.75, pretrained: str | None = None,
                                zero_init_residual: bool = True) -> MultiExpertBackbone:
    """The backbone ``name`` with its last stage(s) replaced by ``experts`` fresh copies at
    ``width`` times their channels (RIDE: 3/4). Pretrained weights, if any, fill the shared stages."""
    if experts < 1:
        raise ValueError(f"experts must be >= 1, got {experts}")
    base = build_backbone(name, pretrained=pretrained, zero_init_residual=zero_init_residual)
    if isinstance(base, CifarResNet):
        shared = nn.Sequential(base.conv1, base.bn1, nn.ReLU(), base.layer1, base.layer2)
        planes = max(1, round(64 * width))
        branches = [_cifar_stage(32, planes, len(base.layer3)) for _ in range(experts)]
        return MultiExpertBackbone(shared, branches, planes, base.stride)
    assert isinstance(base, TorchvisionResNet)
    shared = nn.Sequential(base.stem, base.layer1, base.layer2)
    block = type(base.layer3[0])
    groups = base.layer1[0].conv2.groups
    base_width = base.layer1[0].conv1.out_channels // groups if block is torchvision.models.resnet.Bottleneck else 64
    in_planes = base.layer2[-1].conv1.in_channels  # layer2's output width (= its blocks' input)
    p3, p4 = max(1, round(256 * width)), max(1, round(512 * width))
    branches = []
    for _ in range(experts):
        layer3 = _torchvision_stage(block, in_planes, p3, len(base.layer3), groups, base_width, zero_init_residual)
        layer4 = _torchvision_stage(block, p3 * block.expansion, p4, len(base.layer4), groups, base_width,
                                    zero_init_residual)
        branches.append(nn.Sequential(layer3, layer4))
    return MultiExpertBackbone(shared, branches, p4 * block.expansion, base.stride)


def _cifar_stage(in_planes: int, planes: int, blocks: int) -> nn.Sequential:
    """ResNet-32's last stage (stride 2, option-A shortcut), initialised as CifarResNet is."""
    stage = nn.Sequential(*[_CifarBlock(in_planes if b == 0 else planes, planes, 2 if b == 0 else 1)
                            for b in range(blocks)])
    for m in stage.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return stage


def _torchvision_stage(block, in_planes: int, planes: int, blocks: int, groups: int, base_width: int,
                       zero_init_residual: bool) -> nn.Sequential:
    """A stride-2 stage of torchvision blocks, initialised as torchvision's ResNet is."""
    out = planes * block.expansion
    down = nn.Sequential(nn.Conv2d(in_planes, out, 1, 2, bias=False), nn.BatchNorm2d(out))
    layers = [block(in_planes, planes, 2, down, groups, base_width)]
    layers += [block(out, planes, groups=groups, base_width=base_width) for _ in range(1, blocks)]
    stage = nn.Sequential(*layers)
    for m in stage.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    if zero_init_residual:
        for m in stage:
            last_bn = m.bn3 if hasattr(m, "bn3") else m.bn2
            nn.init.zeros_(last_bn.weight)
    return stage


class ExpertQueues(nn.Module):
    """One labelled queue per expert, written together: ``enqueue`` takes (N, E, D) keys."""

    def __init__(self, queues: Sequence[LabelledQueue]):
        super().__init__()
        self.queues = nn.ModuleList(queues)

    def __getitem__(self, e: int) -> LabelledQueue:
        return self.queues[e]

    def __len__(self) -> int:
        return len(self.queues)

    @torch.no_grad()
    def enqueue(self, keys: Tensor, labels: Tensor) -> None:
        for e, queue in enumerate(self.queues):
            queue.enqueue(keys[:, e], labels)

    def num_valid(self) -> int:
        return self.queues[0].num_valid()  # the same slots are written in every queue


class MultiExpertContrast(nn.Module):
    """Stage 1 on a :class:`MultiExpertBackbone`: per expert e, query head ``g_e``, momentum copy
    ``(f_k, g_k,e)`` and queue ``M_e``; ``forward`` returns one :class:`ContrastOutput` per expert.

    Each view (query, key, the B*L crops) goes through the shared stages once. The key encoder is
    one EMA copy of the whole backbone, so expert e's key path is the EMA of the shared stages and
    of its own branch; the key batch is shuffled once for all experts. PBSD's teacher for expert e
    is ROI-aligned on expert e's feature map and projected by expert e's head.
    """

    def __init__(self, backbone: MultiExpertBackbone, *, feature_dim: int = 128, queue_size: int = 65536,
                 momentum: float = 0.999, key_bn_groups: int = 8, patch_bn_stats: bool = False,
                 num_classes: int | None = None, teacher: str | None = "roi"):
        super().__init__()
        self.encoder = backbone
        self.heads = nn.ModuleList(ProjectionHead(backbone.expert_dim, feature_dim)
                                   for _ in range(backbone.num_experts))
        self.key_encoder = copy.deepcopy(backbone)
        self.key_heads = copy.deepcopy(self.heads)
        _group_batchnorms(self.key_encoder, key_bn_groups)
        for p in [*self.key_encoder.parameters(), *self.key_heads.parameters()]:
            p.requires_grad_(False)
        self.queue = ExpertQueues([LabelledQueue(queue_size, feature_dim) if num_classes is None
                                   else ClassBalancedQueue(queue_size, feature_dim, num_classes)
                                   for _ in range(backbone.num_experts)])
        self.momentum, self.teacher, self.patch_bn_stats = momentum, teacher, patch_bn_stats

    @property
    def num_experts(self) -> int:
        return self.encoder.num_experts

    def query_pairs(self):
        return zip([*self.encoder.parameters(), *self.heads.parameters()],
                   [*self.key_encoder.parameters(), *self.key_heads.parameters()])

    def momentum_update(self) -> None:
        momentum_update(self.query_pairs(), self.momentum)

    @torch.no_grad()
    def encode_keys(self, key_view: Tensor) -> list[Tensor]:
        """(B, 3, S, S) -> E normalised keys (B, D); one shuffle (and one unshuffle) for all experts."""
        x, unshuffle = _shuffle(key_view)
        maps = self.key_encoder.expert_maps(x)
        keys = torch.cat([F.normalize(g(u.mean((2, 3))), dim=1) for g, u in zip(self.key_heads, maps)], 1)
        return list(unshuffle(keys).view(x.shape[0], self.num_experts, -1).unbind(1))

    def _project(self, maps: list[Tensor]) -> list[Tensor]:
        """E feature maps (N, c, h, w) -> E normalised projections (N, D), expert e by head e."""
        return [F.normalize(g(u.mean((2, 3))), dim=1) for g, u in zip(self.heads, maps)]

    def forward(self, query_view: Tensor, key_view: Tensor, patches: Tensor | None = None,
                boxes: Tensor | None = None) -> list[ContrastOutput]:
        """As :meth:`MomentumContrast.forward`, for every expert: a list of E outputs."""
        maps = self.encoder.expert_maps(query_view)  # E x (B, c, h, w)
        queries = self._project(maps)
        with torch.no_grad():
            self.momentum_update()
            keys = self.encode_keys(key_view)
        teachers = students = [None] * self.num_experts
        if patches is not None:
            b, num_patches = patches.shape[:2]
            with torch.no_grad():
                if self.teacher == "roi":
                    teachers = [self.patch_teacher(u.detach(), boxes, g) for u, g in zip(maps, self.heads)]
                elif self.teacher == "global":
                    teachers = [q.detach()[:, None, :].expand(b, num_patches, q.shape[1]) for q in queries]
            with contextlib.nullcontext() if self.patch_bn_stats else frozen_running_stats(self.encoder):
                students = self.student_features(patches)
        return [ContrastOutput(*parts) for parts in zip(queries, keys, teachers, students)]

    def student_features(self, patches: Tensor) -> list[Tensor]:
        """(B, L, 3, P, P) crops -> each expert's (B, L, D) features, all B*L crops through the
        shared stages at once."""
        b, num_patches = patches.shape[:2]
        return [s.view(b, num_patches, -1) for s in self._project(self.encoder.expert_maps(patches.flatten(0, 1)))]

    def patch_teacher(self, feature_map: Tensor, boxes: Tensor, head: nn.Module) -> Tensor:
        """Eq. 11 on one expert's map u_e, projected by that expert's head -> (B, L, D)."""
        b, num_patches = boxes.shape[:2]
        pooled = roi_align(feature_map, list(boxes.to(feature_map.dtype).unbind(0)), output_size=2,
                           spatial_scale=1.0 / self.encoder.stride, sampling_ratio=2, aligned=True)
        return F.normalize(head(pooled.mean((2, 3))), dim=1).view(b, num_patches, -1)


class ExpertStandardizer(nn.Module):
    """A :class:`FeatureStandardizer` per expert, on its slice of the (N, E*c) features."""

    def __init__(self, num_experts: int, dim: int):
        super().__init__()
        self.experts = nn.ModuleList(FeatureStandardizer(dim) for _ in range(num_experts))

    @torch.no_grad()
    def fit(self, features: Tensor, floor: float = 0.01) -> None:
        for norm, part in zip(self.experts, features.chunk(len(self.experts), 1)):
            norm.fit(part, floor)

    def forward(self, v: Tensor) -> Tensor:
        return torch.cat([norm(part) for norm, part in zip(self.experts, v.chunk(len(self.experts), 1))], 1)


class ExpertLinear(nn.Module):
    """A linear layer per expert on its slice of the features: (N, E*c) -> (N, E, C) logits."""

    def __init__(self, num_experts: int, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.linears = nn.ModuleList(nn.Linear(in_features, out_features) for _ in range(num_experts))

    def reset_parameters(self) -> None:
        for fc in self.linears:
            fc.reset_parameters()

    def forward(self, v: Tensor) -> Tensor:
        return torch.stack([fc(part) for fc, part in zip(self.linears, v.chunk(len(self.linears), 1))], 1)


class ExpertClassifier(nn.Module):
    """Stage 2 on a :class:`MultiExpertBackbone`: per expert a standardiser and a linear layer;
    the prediction is the mean of the experts' logits. Same attributes as :class:`Classifier`
    (``backbone``, ``norm``, ``fc``, ``head``), so stage 2 trains either the same way."""

    def __init__(self, backbone: MultiExpertBackbone, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.norm = ExpertStandardizer(backbone.num_experts, backbone.expert_dim)
        self.fc = ExpertLinear(backbone.num_experts, backbone.expert_dim, num_classes)

    @property
    def num_experts(self) -> int:
        return self.backbone.num_experts

    def expert_logits(self, features: Tensor) -> Tensor:
        """(N, E*c) backbone features -> (N, E, num_classes) logits of each expert."""
        return self.fc(self.norm(features))

    def head(self, features: Tensor) -> Tensor:
        """(N, E*c) backbone features -> (N, num_classes) logits of the ensemble."""
        return self.expert_logits(features).mean(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


def build_classifier(backbone: nn.Module, num_classes: int) -> nn.Module:
    """The stage-2 model of a backbone: :class:`ExpertClassifier` on a multi-expert one."""
    if isinstance(backbone, MultiExpertBackbone):
        return ExpertClassifier(backbone, num_classes)
    return Classifier(backbone, num_classes)
