"""Data: long-tailed data sets and their splits, class-balanced sampling, view transforms."""

from dscl.data.datasets import DATASET_NAMES, DataSplits, TransformedDataset, build_splits
from dscl.data.images import (IMAGE_EXTENSIONS, ArrayDataset, ImageListDataset,
                              find_bad_images, load_rgb)
from dscl.data.longtail import holdout_indices, longtail_counts, longtail_indices, shot_groups
from dscl.data.samplers import ClassBalancedSampler, NaturalSampler
from dscl.data.synthetic import SyntheticLongTailed
from dscl.data.transforms import (CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD,
                                  ViewPatchTransform, ce_train_transform, eval_transform,
                                  query_view_transform)

__all__ = [
    "ArrayDataset",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "ClassBalancedSampler",
    "NaturalSampler",
    "DATASET_NAMES",
    "DataSplits",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "ImageListDataset",
    "SyntheticLongTailed",
    "TransformedDataset",
    "ViewPatchTransform",
    "build_splits",
    "ce_train_transform",
    "eval_transform",
    "find_bad_images",
    "holdout_indices",
    "load_rgb",
    "longtail_counts",
    "longtail_indices",
    "query_view_transform",
    "shot_groups",
]
