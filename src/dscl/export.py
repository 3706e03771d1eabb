"""``dscl export``: a run's classifier as a file that runs without dscl.

- ``torchvision``: a plain state dict of the torchvision model of the run's backbone, with the
  feature standardisation folded into ``fc`` (``W' = W / std``, ``b' = b - W' mean``), so the
  unmodified torchvision network gives the same logits. ResNet-32 has no torchvision
  constructor: its state dict fits :class:`dscl.models.standalone.ResNet32`, a torch-only file.
- ``torchscript``: the whole classifier, traced (with ``model.experts > 1`` the ensemble: mean of
  the experts' logits; it has no torchvision equivalent).
- ``onnx``: the whole classifier, with a dynamic batch axis (needs ``pip install "dscl[onnx]"``).
- ``run`` (:func:`export_run`): a slim run folder that ``dscl.load``, ``dscl predict`` and
  ``dscl evaluate`` read like the run itself: only the weights the classifier needs (the
  stage-1 encoder without its momentum copy, heads and queue; the kept stage-2 layer), the
  config, model card and results. The weights published with dscl are such folders.

Every export takes normalised (N, 3, S, S) images and returns (N, C) logits, and is checked in
a fresh Python process that imports only torch / torchvision (or onnxruntime): its logits on a
batch must equal dscl's within :data:`TOLERANCE`. ``FILE.json`` beside it records the class
names, image size, mean and std.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from .config import load_config
from .engine.checkpoint import save_checkpoint
from .files import atomic_write_bytes, write_json, write_yaml
from .engine.linear import stage1_backbone_prefix
from .engine.rundir import RunDir
from .engine.trained import CARD, TrainedClassifier, load, load_classifier, stage1_state
from .weights import run_folder
from .errors import CheckpointError, ConfigError
from .models import CifarResNet, ExpertClassifier, TorchvisionResNet
from .models import standalone

FORMATS = ("torchvision", "torchscript", "onnx", "run")
TOLERANCE = 1e-4  # largest |logit difference| accepted between the export and dscl
CHECK_BATCH = 3  # images in the check batch: not the batch of 2 the export was traced with


def folded_fc(classifier: nn.Module) -> nn.Linear:
    """One Linear layer equal to ``fc(norm(v))``: the standardisation folded into the weights."""
    fc, norm = classifier.fc, classifier.norm
    folded = nn.Linear(fc.in_features, fc.out_features)
    with torch.no_grad():
        weight = fc.weight.double() / norm.std.double()  # (C, d): column j divided by std_j
        folded.weight.copy_(weight)
        folded.bias.copy_(fc.bias.double() - weight @ norm.mean.double())
    return folded


def torchvision_state_dict(classifier: nn.Module) -> dict:
    """The classifier as the state dict of its torchvision model (ResNet-32: the standalone one)."""
    backbone = classifier.backbone
    if isinstance(classifier, ExpertClassifier):
        raise ConfigError(f"--format torchvision: an ensemble of {classifier.num_experts} experts (model.experts) has "
                          "no torchvision equivalent; use --format torchscript or onnx")
    state = backbone.state_dict()
    if isinstance(backbone, TorchvisionResNet):  # stem = (conv1, bn1, relu, maxpool)
        state = {k.replace("stem.0.", "conv1.", 1).replace("stem.1.", "bn1.", 1): v for k, v in state.items()}
    elif not isinstance(backbone, CifarResNet):
        raise ConfigError(f"--format torchvision: no torchvision model for {type(backbone).__name__}")
    fc = folded_fc(classifier)
    return {**{k: v.detach().cpu().clone() for k, v in state.items()},
            "fc.weight": fc.weight.detach().clone(), "fc.bias": fc.bias.detach().clone()}


def _torchscript_bytes(classifier: nn.Module, example: torch.Tensor, card: dict) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # TorchScript is deprecated in favour of torch.export
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(classifier, example, check_trace=False)
        torch.jit.save(traced, buffer, _extra_files={"dscl.json": json.dumps(card)})
    return buffer.getvalue()


def _onnx_bytes(classifier: nn.Module, example: torch.Tensor, card: dict) -> bytes:
    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"--format onnx needs {' and '.join(missing)}: pip install \"dscl[onnx]\"")
    import onnx

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(classifier, (example,), buffer, dynamo=False, input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17)
    model = onnx.load_from_string(buffer.getvalue())
    entry = model.metadata_props.add()
    entry.key, entry.value = "dscl", json.dumps(card)
    return model.SerializeToString()


# Run in a fresh interpreter: loads the export with torch / torchvision / onnxruntime only and
# saves its logits on the check batch. argv: format, file, batch, output, architecture, classes.
_CHECK = r"""
import sys
import torch
fmt, path, batch_file, out_file, arch, num_classes = sys.argv[1:7]
images = torch.load(batch_file)
if fmt == "torchvision":
    if arch == "resnet32":
        scope = {}
        exec(compile(open(sys.argv[7]).read(), sys.argv[7], "exec"), scope)
        net = scope["ResNet32"](int(num_classes))
    else:
        import torchvision
        net = getattr(torchvision.models, arch)()
        net.fc = torch.nn.Linear(net.fc.in_features, int(num_classes))
    net.load_state_dict(torch.load(path, weights_only=True), strict=True)
    with torch.no_grad():
        logits = net.eval()(images)
elif fmt == "torchscript":
    with torch.no_grad():
        logits = torch.jit.load(path)(images)
else:
    import onnxruntime
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    logits = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
assert "dscl" not in sys.modules, "the check must not import dscl"
torch.save(logits, out_file)
"""


def check_in_fresh_process(path: Path, fmt: str, arch: str, images: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest |logit difference| between the exported file, run in a new Python process that
    imports no dscl, and ``expected``; raises CheckpointError above :data:`TOLERANCE`."""
    with tempfile.TemporaryDirectory() as tmp:
        batch_file, out_file = Path(tmp) / "images.pt", Path(tmp) / "logits.pt"
        torch.save(images.cpu(), batch_file)
        argv = [sys.executable, "-I", "-c", _CHECK, fmt, str(path), str(batch_file), str(out_file), arch,
                str(expected.shape[1]), standalone.__file__]
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CheckpointError(f"{path}: the exported file failed to run without dscl:\n{proc.stderr.strip()}")
        logits = torch.load(out_file)
    diff = float((logits.float() - expected.cpu().float()).abs().max())
    if not diff <= TOLERANCE:
        raise CheckpointError(f"{path}: its logits differ from dscl's by up to {diff:.3g} (> {TOLERANCE:g})")
    return diff


def export_run(run_dir: str | Path, out: str | Path, data_root: str | None = None) -> str:
    """Write the slim copy of a finished run folder to the new folder ``out``: config.yaml,
    model.json, results.json and checkpoints holding only the classifier's weights, their
    ``config`` the copied one. ``data_root`` replaces ``data.root`` in all of them (where the
    data lies for the folder's users; ``dscl evaluate --data`` overrides it anyway)."""
    src, out = run_folder(run_dir), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out}: exists and is not empty")
    cfg = load_config(src / "config.yaml")
    config = cfg.to_dict()
    old_root = config["data"]["root"]
    if data_root is not None:
        config["data"]["root"] = data_root
    run = RunDir(src, is_main=False)
    run.config = cfg.to_dict()
    stage1 = stage1_state(run)
    load_classifier(cfg, run, state=stage1)  # refuses an unfinished or inconsistent run
    head = {"format": run.load(run.checkpoint("pretrain"))["format"], "config": config}
    if cfg.method_spec.stage2:
        prefix = stage1_backbone_prefix(cfg)
        stage1 = {k: v for k, v in stage1.items() if k.startswith(prefix)}
        best = run.load(run.checkpoint("linear_best"))
        kept = ("stage", "fc", "norm", "best_epoch", "best_val", "complete")
        save_checkpoint(out / "checkpoints" / "linear_best.pt", {**head, **{k: best[k] for k in kept}})
    save_checkpoint(out / "checkpoints" / "pretrain.pt",
                    {**head, "stage": "pretrain", "model": stage1, "complete": True})
    write_yaml(out / "config.yaml", config)
    for name in (CARD, "results.json"):
        if (src / name).is_file():
            values = json.loads((src / name).read_text(encoding="utf-8"))
            data = values.get("data")
            if data_root is not None and isinstance(data, dict) and data.get("root") == old_root:
                data["root"] = data_root
            write_json(out / name, values)
    model = load(out)
    return (f"wrote {out}: {sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 1e6:.1f} MB, "
            f"{model.card.get('method')} on {len(model.classes)} classes; use it as the run folder: "
            f"dscl.load(\"{out}\"), dscl predict {out} IMAGES, dscl evaluate {out} --data ROOT")


def export(model: TrainedClassifier, fmt: str, out: str | Path, *, check: bool = True) -> str:
    """Write ``model`` to ``out`` in format ``fmt`` (one of :data:`FORMATS`) and ``out``.json
    beside it; returns a message saying how to use the file."""
    if fmt not in FORMATS or fmt == "run":
        raise ConfigError(f"--format: one of {', '.join(FORMATS[:-1])}, got {fmt!r} (run: export_run)")
    out = Path(out)
    classifier = copy.deepcopy(model.classifier).cpu().eval()
    size, num_classes = model.image_size, len(model.classes)
    arch = model.card.get("backbone", "")
    card = {"format": fmt, "backbone": arch, "classes": model.classes, "image_size": size,
            "mean": list(model.mean), "std": list(model.std), "preprocessing": model.card.get("preprocessing"),
            "input": f"images (N, 3, {size}, {size}) float32, normalised", "output": f"logits (N, {num_classes})",
            "dscl_version": model.card.get("dscl_version"), "run": str(model.path)}
    if isinstance(classifier, ExpertClassifier):
        card["output"] += f", the mean of {classifier.num_experts} experts' logits"
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    if fmt == "torchvision":
        state = torchvision_state_dict(classifier)
        atomic_write_bytes(out, lambda fh: torch.save(state, fh))
    else:
        data = (_torchscript_bytes if fmt == "torchscript" else _onnx_bytes)(classifier, example, card)
        atomic_write_bytes(out, lambda fh: fh.write(data))
    sidecar = out.with_name(out.name + ".json")
    write_json(sidecar, card)
    lines = [f"wrote {out} ({fmt}) and {sidecar.name} (class names, image size, mean, std)"]
    if fmt == "torchvision" and arch == "resnet32":
        lines += ["resnet32 has no torchvision constructor: the file fits ResNet32 of src/dscl/models/standalone.py,",
                  "a torch-only file to copy (with dscl installed: from dscl.models.standalone import ResNet32):",
                  f"  net = ResNet32(num_classes={num_classes}); net.load_state_dict(torch.load(\"{out.name}\")); "
                  "net.eval()", "the feature standardisation is folded into fc"]
    elif fmt == "torchvision":
        lines += [f"  net = torchvision.models.{arch}(); net.fc = torch.nn.Linear({classifier.fc.in_features}, "
                  f"{num_classes})", f"  net.load_state_dict(torch.load(\"{out.name}\")); net.eval()",
                  "the feature standardisation is folded into fc"]
    elif fmt == "torchscript":
        lines.append(f"  net = torch.jit.load(\"{out.name}\")")
    else:
        lines.append(f"  onnxruntime.InferenceSession(\"{out.name}\"): input 'images', output 'logits'")
    lines += [f"input: (N, 3, {size}, {size}) float images, {card['preprocessing']}",
              f"  mean {tuple(model.mean)}, std {tuple(model.std)}"]
    if check:
        images = torch.randn(CHECK_BATCH, 3, size, size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = classifier(images)
        diff = check_in_fresh_process(out, fmt, arch, images, expected)
        lines.append(f"checked in a fresh process without dscl: logits within {diff:.1e} of dscl's on "
                     f"{CHECK_BATCH} images")
    return "\n".join(lines)
