"""Projection head ``g`` of the contrastive stage and the linear classifier of stage 2."""

from torch import Tensor, nn


class ProjectionHead(nn.Module):
    """Linear(d, d) - ReLU - Linear(d, out_dim), as in MoCo v2 and the paper."""

    def __init__(self, in_dim: int, out_dim: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))

    def forward(self, x: Tensor) -> Tensor:  # (N, d) -> (N, out_dim), not normalised
        return self.net(x)


class Classifier(nn.Module):
    """Backbone followed by a linear layer: the end-to-end CE baseline and the stage-2 model."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(backbone.out_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.backbone(x))
