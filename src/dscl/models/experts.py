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

from collections.abc import Sequence

import torch
import torchvision
from torch import Tensor, nn

from .backbones import Backbone, CifarResNet, TorchvisionResNet, _CifarBlock, build_backbone
from .heads import Classifier, FeatureStandardizer, ProjectionHead
from .momentum import MomentumContrast
from .queue import LabelledQueue


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


class MultiExpertContrast(MomentumContrast):
    """Stage 1 on a :class:`MultiExpertBackbone`: per expert e, query head ``g_e``, momentum copy
    ``(f_k, g_k,e)`` and queue ``M_e``; ``forward`` returns a list of outputs, one per expert.

    Each view (query, key, the B*L crops) goes through the shared stages once. The key encoder is
    one EMA copy of the whole backbone, so expert e's key path is the EMA of the shared stages and
    of its own branch; the key batch is shuffled once for all experts. PBSD's teacher for expert e
    is ROI-aligned on expert e's feature map and projected by expert e's head. Everything else
    (construction, momentum update, key shuffle, enqueue, forward) is :class:`MomentumContrast`'s.
    """

    head_name = "heads"

    @property
    def num_experts(self) -> int:
        return self.encoder.num_experts

    def new_head(self, feature_dim: int) -> nn.ModuleList:
        return nn.ModuleList(ProjectionHead(self.encoder.expert_dim, feature_dim) for _ in range(self.num_experts))

    def new_queue(self, size: int, dim: int, num_classes: int | None) -> ExpertQueues:
        new = super().new_queue
        return ExpertQueues([new(size, dim, num_classes) for _ in range(self.num_experts)])

    def _heads(self, key: bool = False) -> list[nn.Module]:
        return list(self.key_heads if key else self.heads)

    def feature_maps(self, encoder: MultiExpertBackbone, x: Tensor) -> list[Tensor]:
        return encoder.expert_maps(x)  # the shared stages run once

    def _per_head(self, values: list) -> list:
        return values

    @torch.no_grad()
    def encode_keys(self, key_view: Tensor) -> list[Tensor]:
        """(B, 3, S, S) -> E normalised keys (B, D); one shuffle (and one unshuffle) for all experts."""
        keys = super().encode_keys(key_view)
        return list(keys.view(keys.shape[0], self.num_experts, -1).unbind(1))

    def key_features(self, x: Tensor) -> Tensor:
        """(B, 3, S, S) -> the E experts' normalised keys side by side, (B, E*D)."""
        return torch.cat(self._project(self.feature_maps(self.key_encoder, x), key=True), 1)


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
