"""Projection head ``g`` of the contrastive stage and the linear classifier of stage 2."""

import torch
from torch import Tensor, nn


class ProjectionHead(nn.Module):
    """Linear(d, d) - ReLU - Linear(d, out_dim), as in MoCo v2 and the paper."""

    def __init__(self, in_dim: int, out_dim: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))

    def forward(self, x: Tensor) -> Tensor:  # (N, d) -> (N, out_dim), not normalised
        return self.net(x)


class FeatureStandardizer(nn.Module):
    """``(v - mean) / std`` per feature, with fixed buffers and no learnable parameter.

    Stage 2 sets them once from the training features, so the linear probe sees unit-scale
    inputs whatever the backbone's feature scale (a probe at a fixed lr otherwise diverges on
    one backbone and crawls on another). Identity until set.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, features: Tensor, floor: float = 0.01) -> None:
        """Set the statistics from (N, dim) features.

        A feature (nearly) constant on these images, e.g. a ReLU channel that is 0 on every
        un-augmented image, may still move on augmented views; its std is floored at ``floor``
        times the mean std of all features, so it cannot be blown up by orders of magnitude.
        """
        std = features.std(0, unbiased=False)
        self.mean.copy_(features.mean(0))
        self.std.copy_(std.clamp(min=max(floor * float(std.mean()), 1e-12)))

    def forward(self, v: Tensor) -> Tensor:
        return (v - self.mean) / self.std


class Classifier(nn.Module):
    """Backbone, feature standardisation (identity unless fitted), linear layer: the end-to-end
    CE baseline (never fitted) and the stage-2 model."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.norm = FeatureStandardizer(backbone.out_dim)
        self.fc = nn.Linear(backbone.out_dim, num_classes)

    def head(self, features: Tensor) -> Tensor:
        """(N, d) backbone features -> (N, num_classes) logits."""
        return self.fc(self.norm(features))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))
