"""Backbones, heads, the labelled queue and the momentum-contrast model of stage 1."""

from .backbones import BACKBONES, Backbone, CifarResNet, TorchvisionResNet, build_backbone
from .experts import (ExpertClassifier, MultiExpertBackbone, MultiExpertContrast, build_classifier,
                      build_multi_expert_backbone)
from .heads import Classifier, ProjectionHead
from .momentum import ContrastOutput, GroupedBatchNorm2d, MomentumContrast, counted_once
from .queue import LabelledQueue

__all__ = [
    "BACKBONES", "Backbone", "CifarResNet", "Classifier", "ContrastOutput", "ExpertClassifier", "GroupedBatchNorm2d",
    "LabelledQueue", "MomentumContrast", "MultiExpertBackbone", "MultiExpertContrast", "ProjectionHead",
    "TorchvisionResNet", "build_backbone", "build_classifier", "build_multi_expert_backbone", "counted_once",
]
