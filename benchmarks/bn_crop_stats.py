"""What patch crops in the BatchNorm running statistics cost, on one trained stage-1 encoder.

    python benchmarks/bn_crop_stats.py RUN_DIR [--batches 40]

RUN_DIR is a finished run (checkpoints/pretrain.pt of a contrastive method, with a validation
split). The encoder's running statistics are re-estimated twice from the same training batches:
once from the 32-px global views only, once as stage-1 training with
``pretrain.patch_bn_stats: true`` would update them (each batch's global views, then its L
patch crops). Each variant is scored by the cosine k-NN top-1 of the validation images against
the training set (the health signal of stage 1). Prints both figures.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
import yaml

from dscl.config import config_from_dict
from dscl.engine.evaluate import extract_features, knn_predict
from dscl.engine.checkpoint import load_checkpoint
from dscl.engine.linear import backbone_from_stage1
from dscl.engine.runner import load_data
from dscl.data.loading import images_in_memory
from dscl.engine.views import eval_loader, stage1_transform


@torch.no_grad()
def recalibrate(backbone, images, transform, batches: int, batch: int, with_crops: bool):
    net = copy.deepcopy(backbone)
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
    net.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(batches):
        index = torch.randint(0, images.shape[0], (batch,), generator=g)
        query, _, patches, _ = transform(images[index], generator=g)
        net(query)
        if with_crops:
            net(patches.flatten(0, 1))
    return net.eval()


def knn_top1(backbone, train_loader, val_loader) -> float:
    bank, bank_labels = extract_features(backbone, train_loader, device=torch.device("cpu"))
    features, labels = extract_features(backbone, val_loader, device=torch.device("cpu"))
    return 100.0 * float((knn_predict(bank, bank_labels, features) == labels).double().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--batches", type=int, default=40)
    args = parser.parse_args()
    cfg = config_from_dict(yaml.safe_load((args.run / "config.yaml").read_text()))
    splits = load_data(cfg)
    backbone = backbone_from_stage1(cfg, load_checkpoint(args.run / "checkpoints" / "pretrain.pt")["model"])
    cfg.method = "dscl+pbsd"  # the transform that draws the patch crops
    images, _ = images_in_memory(splits.train, torch.device("cpu"))
    transform = stage1_transform(cfg, splits.image_size, on_device=True)
    loaders = [eval_loader(ds, splits.image_size, on_device=True, batch=512, device=torch.device("cpu"))
               for ds in (splits.train, splits.val)]
    for with_crops in (False, True):
        net = recalibrate(backbone, images, transform, args.batches, cfg.pretrain.batch_size, with_crops)
        label = "global views + patch crops" if with_crops else "global views only"
        print(f"running statistics from {label}: k-NN top-1 {knn_top1(net, *loaders):.2f} %", flush=True)


if __name__ == "__main__":
    main()
