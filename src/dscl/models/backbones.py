"""Backbones without their classifier: a CIFAR-style ResNet-32 and torchvision ImageNet ResNets.

Every backbone exposes ``forward_features(x) -> u`` (the last feature map, (B, C, h, w)),
``forward(x) -> v`` (its global average pool, (B, C)), ``out_dim`` (C) and ``stride`` (input
pixels per feature-map cell), which the patch teacher needs for ``roi_align``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from ..errors import ConfigError

TORCHVISION_BACKBONES = {
    "resnet50": (torchvision.models.resnet50, "IMAGENET1K_V1"),
    "resnext50_32x4d": (torchvision.models.resnext50_32x4d, "IMAGENET1K_V1"),
    "resnet152": (torchvision.models.resnet152, "IMAGENET1K_V1"),
    "resnet18": (torchvision.models.resnet18, "IMAGENET1K_V1"),
}
BACKBONES = ("resnet32", *TORCHVISION_BACKBONES)


class Backbone(nn.Module):
    """Feature map, pooled feature, and the geometry the patch teacher needs."""

    out_dim: int
    stride: int
    early_stages_frozen: bool = False

    def forward_features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x).mean((2, 3))  # (B, C)

    def last_stage(self) -> nn.Module:
        raise NotImplementedError

    def freeze_early_stages(self) -> None:
        """Train the last stage only (Places-LT fine-tuning): every other parameter takes no
        gradient, and every other module stays in eval mode, so its BatchNorm keeps the
        pretrained running statistics instead of re-estimating them on the new data."""
        last = set(map(id, self.last_stage().parameters()))
        for p in self.parameters():
            p.requires_grad_(id(p) in last)
        self.early_stages_frozen = True
        self.train(self.training)

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        if self.early_stages_frozen:
            last = set(map(id, self.last_stage().modules()))
            for m in self.modules():
                if id(m) not in last and m is not self:
                    m.training = False
        return self


class _CifarBlock(nn.Module):
    """Basic block with the parameter-free 'option A' shortcut of the CIFAR ResNets."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes - in_planes if (stride != 1 or in_planes != planes) else 0
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.pad:  # subsample and pad channels with zeros
            shortcut = F.pad(x[:, :, :: self.stride, :: self.stride],
                             (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + shortcut)


class CifarResNet(Backbone):
    """ResNet-(6n+2) for 32-px images (He et al. 2016, section 4.2); ResNet-32 has n = 5."""

    def __init__(self, depth: int = 32):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in [(16, 1), (32, 2), (64, 2)]:
            blocks = []
            for b in range(n):
                blocks.append(_CifarBlock(in_planes, planes, stride if b == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.out_dim, self.stride = 64, 4
        # No zero-init of the last BN gamma here: the channels an option-A
        # shortcut pads with zeros would start at exactly 0 after the ReLU, pass no gradient
        # and stay dead for the whole run.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))  # (B, 64, S/4, S/4)

    def last_stage(self) -> nn.Module:
        return self.layer3


class TorchvisionResNet(Backbone):
    """A torchvision ResNet / ResNeXt with its classifier removed."""

    def __init__(self, net: torchvision.models.ResNet):
        super().__init__()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.out_dim, self.stride = net.fc.in_features, 32

    def forward_features(self, x: Tensor) -> Tensor:
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))  # (B, C, S/32, S/32)

    def last_stage(self) -> nn.Module:
        return self.layer4


def build_backbone(name: str, *, pretrained: str | None = None, zero_init_residual: bool = True) -> Backbone:
    """Build a backbone by name.

    zero_init_residual: zero the last BN gamma of each residual block, for the torchvision
    ResNets only (they have convolutional shortcuts); ResNet-32 never takes it.
    pretrained: None (random init), a path to a local state-dict file (a plain or
    ``{"state_dict": ...}`` checkpoint of the torchvision model, ``fc.*`` ignored), or
    ``"torchvision"`` to download torchvision's ImageNet weights (the only download path).
    """
    if name == "resnet32":
        if pretrained:
            raise ConfigError("model.pretrained: no pretrained weights exist for resnet32")
        return CifarResNet(32)
    if name not in TORCHVISION_BACKBONES:
        raise ConfigError(f"model.backbone: unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    factory, weights_name = TORCHVISION_BACKBONES[name]
    if pretrained == "torchvision":
        net = factory(weights=weights_name)
    else:
        net = factory(weights=None, zero_init_residual=zero_init_residual and not pretrained)
        if pretrained:
            _load_local_weights(net, Path(pretrained))
    return TorchvisionResNet(net)


def _load_local_weights(net: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"model.pretrained: no such file {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise ConfigError(f"model.pretrained: cannot read {path}: {exc}") from exc
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ConfigError(f"model.pretrained: {path} does not fit the backbone "
                          f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
