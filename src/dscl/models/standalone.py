"""A torch-only ResNet-32 classifier for ``dscl export --format torchvision`` files of resnet32 runs.

torchvision has no CIFAR ResNet-32, so this file defines one whose state dict has the export's
keys; it imports nothing but torch, so it can be copied next to the exported file and used
without dscl::

    net = ResNet32(num_classes=10)
    net.load_state_dict(torch.load("model.pt"), strict=True)
    logits = net.eval()(images)  # (N, 3, 32, 32) normalised images -> (N, 10)
"""

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 convolutions; the shortcut subsamples and zero-pads channels (no parameters)."""

    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes - in_planes
        self.stride = stride

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x
        if self.pad:
            shortcut = x[:, :, :: self.stride, :: self.stride]
            shortcut = F.pad(shortcut, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + shortcut)


class ResNet32(nn.Module):
    """ResNet-32 for 32-px images (He et al. 2016, section 4.2) with a linear classifier ``fc``."""

    def __init__(self, num_classes=10, blocks=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        for name, planes, stride in [("layer1", 16, 1), ("layer2", 32, 2), ("layer3", 64, 2)]:
            layers = []
            for b in range(blocks):
                layers.append(BasicBlock(in_planes, planes, stride if b == 0 else 1))
                in_planes = planes
            setattr(self, name, nn.Sequential(*layers))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))  # (N, 64, 8, 8) at 32 px
        return self.fc(torch.flatten(x.mean((2, 3)), 1))
