"""``dscl bench``: time one full stage-1 training step on generated tensors.

The step is what training does: forward of the query view, key view and patches, both losses,
backward, SGD, EMA update, enqueue, with the queue full (every slot valid). It is timed after
warm-up and set beside a plain cross-entropy step of the same backbone, batch and device, and
beside its arithmetic cost: per image, 3 units for the query view (forward + backward), 1 for the
key view (forward only) and 3 L (P/S)^2 for the patches, against 3 for the CE step. It also
counts the parameters (trained ones of stage 1; the backbone's) and the backbone's multiply-adds
for one image, which is how a multi-expert backbone (``model.experts``) compares with one.
"""

from __future__ import annotations

import functools
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .config import load_config
from .engine.distributed import resolve_device
from .engine.pretrain import build_encoder, build_stage1_model, optimise, prepare_model, stage1_losses
from .engine.views import patch_size
from .losses import dense
from .models import MultiExpertContrast, build_classifier



def per_index_students(model, patches: torch.Tensor):
    """The reference way to compute PBSD's students, as the authors' code does: one forward per
    crop index (so BatchNorm's batch statistics are per index). What ``--reference`` times
    against the model's own batched ``student_features``."""
    num_patches = patches.shape[1]
    if isinstance(model, MultiExpertContrast):
        per_patch = [model._project(model.encoder.expert_maps(patches[:, j])) for j in range(num_patches)]
        return [torch.stack([p[e] for p in per_patch], 1) for e in range(model.num_experts)]
    return torch.stack([F.normalize(model.head(model.encoder(patches[:, j])), dim=1) for j in range(num_patches)], 1)

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(step, steps: int, warmup: int, device: torch.device) -> float:
    """Median milliseconds of ``steps`` timed steps after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        _sync(device)
        tic = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - tic)
    return statistics.median(times) * 1000.0


def bench(config: Path | None, overrides=(), *, reference: bool = False, steps: int = 5, warmup: int = 2,
          num_classes: int = 100, print_json: bool = True) -> dict:
    cfg = load_config(config, overrides)
    device = resolve_device(cfg.device)
    size = cfg.data.image_size or (32 if cfg.model.backbone == "resnet32" else 224)
    b, p = cfg.pretrain.batch_size, patch_size(cfg, size)
    torch.manual_seed(cfg.seed)
    gen = dict(device=device)
    labels = torch.randint(0, num_classes, (b,), **gen)
    if not cfg.method_spec.contrastive:
        raise SystemExit("dscl bench times a contrastive method against CE; choose method=scl, dscl, ... ")
    model = prepare_model(build_stage1_model(cfg, num_classes).to(device).train(), cfg)
    if reference:
        model.student_features = functools.partial(per_index_students, model)
    with torch.no_grad():  # a full queue of unit keys with real labels (one queue per expert)
        for queue in getattr(model.queue, "queues", [model.queue]):
            queue.keys.copy_(F.normalize(torch.randn_like(queue.keys), dim=1))
            queue.labels.copy_(torch.randint(0, num_classes, queue.labels.shape, **gen))
    num_patches = cfg.pretrain.num_patches
    boxes = torch.tensor([0.0, 0.0, size / 2, size / 2], **gen).repeat(b, num_patches, 1)
    batch = ((torch.randn(b, 3, size, size, **gen), torch.randn(b, 3, size, size, **gen),
              torch.randn(b, num_patches, 3, p, p, **gen), boxes), labels)
    optimizer = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=0.01, momentum=0.9)
    losses = {}
    if reference:
        losses = {"supcon": dense.dense_decoupled_supcon_loss, "pbsd": dense.dense_patch_distillation_loss}

    def step():
        loss, parts, keys = stage1_losses(model, batch, cfg, device, num_classes=num_classes, **losses)
        optimise(model, optimizer, loss, keys, labels)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_ms = _time_steps(step, steps, warmup, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _peak_rss_mb()
    ce_ms = _ce_step_ms(cfg, num_classes, batch[0][0], labels, steps, warmup, device)
    patch_units = 3 * num_patches * (p / size) ** 2 if cfg.uses_pbsd else 0.0
    flop_ratio = (3 + 1 + patch_units) / 3
    result = {
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({torch.get_num_threads()} threads)"),
        "method": cfg.method, "variant": "reference" if reference else "optimised", "backbone": cfg.model.backbone,
        "image_size": size, "patch_size": p, "num_patches": num_patches, "batch_size": b,
        "queue_size": cfg.pretrain.queue_size, "images_per_s": round(b / step_ms * 1000, 2),
        "step_ms": round(step_ms, 2),
        "peak_mem_mb": round(peak, 1), "ce_images_per_s": round(b / ce_ms * 1000, 2), "ce_step_ms": round(ce_ms, 2),
        "flop_ratio": round(flop_ratio, 3), "measured_ratio": round(step_ms / ce_ms, 3),
        "precision": cfg.precision, "channels_last": cfg.channels_last, "compile": cfg.compile,
        "experts": cfg.model.experts, "params": sum(q.numel() for q in model.parameters() if q.requires_grad),
        "backbone_params": sum(q.numel() for q in model.encoder.parameters()),
        "backbone_macs": _macs_per_image(model.encoder, size, device),
    }
    if print_json:
        print(json.dumps(result))
    return result


def _macs_per_image(backbone: torch.nn.Module, size: int, device: torch.device) -> int:
    """Multiply-adds of one image's forward through the backbone (convolutions and matmuls)."""
    was_training = backbone.training
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        backbone.eval()(torch.zeros(1, 3, size, size, device=device))
    backbone.train(was_training)
    return counter.get_total_flops() // 2


def _ce_step_ms(cfg, num_classes, images, labels, steps, warmup, device) -> float:
    if cfg.model.experts > 1:  # no ce run takes experts: time the same ensemble trained end to end on CE
        ce_cfg = load_config(base={**cfg.to_dict(), "method": "ce", "model": {**cfg.to_dict()["model"], "experts": 1}})
        model = prepare_model(build_classifier(build_encoder(cfg), num_classes).to(device).train(), ce_cfg)
    else:
        ce_cfg = load_config(base={**cfg.to_dict(), "method": "ce"})
        model = prepare_model(build_stage1_model(ce_cfg, num_classes).to(device).train(), ce_cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        loss, _, _ = stage1_losses(model, (images, labels), ce_cfg, device)
        optimise(model, optimizer, loss, None, labels)

    return _time_steps(step, steps, warmup, device)


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
