"""Run configuration: typed defaults, YAML recipes, ``--set key=value`` overrides, validation.

A recipe is a YAML mapping whose keys mirror the dataclasses below; anything it leaves out
keeps its default. Unknown keys, values of the wrong type and values out of range raise
:class:`ConfigError` naming the dotted key (and the file). Only the engine and the CLI read a
config; library code takes plain arguments.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .data.datasets import default_ratio
from .data.transforms import STRONG_AUGMENTS
from .errors import ConfigError
from .methods import METHODS, Method, get_method  # noqa: F401  (METHODS: the names, for callers)


@dataclass
class DataConfig:
    name: str = "synthetic"
    root: str | None = None
    # None: the data set's default: 100 for cifar10-lt, cifar100-lt and synthetic; every file of an
    # image folder (the long-tailed subset only when a ratio is given); the split files' own lists
    imbalance_ratio: float | None = None
    download: bool = False
    val_per_class: int | None = None  # held-out validation images per class; None: 20 for CIFAR-LT, else 0
    test_folder: str = "test"  # imagefolder: the folder under root read as the test split (e.g. val)
    image_size: int | None = None  # None: the data set's native size (32 for CIFAR / synthetic, else 224)
    num_workers: int = 0
    pipeline: Literal["auto", "pil", "tensor"] = "auto"  # per-image PIL transforms, or batched on the device
    profile: Literal["exponential", "pareto"] = "exponential"  # how the class sizes fall from head to tail
    skip_bad_images: bool = False
    synthetic_classes: int = 10
    synthetic_n_max: int = 500
    synthetic_eval_per_class: int = 100


@dataclass
class ModelConfig:
    backbone: str = "resnet32"
    pretrained: str | None = None  # local weights file, or "torchvision" to download ImageNet weights
    train_last_stage_only: bool = False
    feature_dim: int = 128
    experts: int = 1  # > 1: RIDE-style experts sharing the early stages (docs/RECIPES.md); 1: the plain backbone
    expert_width: float = 0.75  # with experts > 1: each expert's last stage(s) at this fraction of the channels


@dataclass
class PretrainConfig:
    """Stage 1: the representation (for ``ce``: the whole network, end to end)."""

    epochs: int = 200
    batch_size: int = 256
    lr: float = 0.1  # for a batch of 256; scaled linearly with batch_size
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 10
    queue_size: int = 65536
    ema_momentum: float = 0.999
    temperature: float = 0.07
    alpha: float | None = 0.1
    la_tau: float = 1.0  # ce-la: the logit adjustment's tau (1: Balanced Softmax)
    beta: float | None = None  # the authors' spelling; when set, alpha = 1 / (1 + beta)
    pbsd_weight: float = 1.5
    pbsd_teacher_temperature: float | None = None  # None: pretrain.temperature (the paper's); lower: a sharper teacher
    num_patches: int = 5
    patch_size: int | None = None  # None: 64 at 224 px, S / 2 below
    patch_scale: tuple[float, float] = (0.05, 0.6)
    crop_scale: tuple[float, float] | None = None  # None: (0.08, 1) at 224 px, (0.2, 1) below
    key_bn_groups: int = 8
    patch_bn_stats: bool = False  # let the patch crops update BatchNorm running statistics
    # Ablation variants (docs/ABLATIONS.md); the defaults are the method
    pbsd_teacher: Literal["roi", "global"] = "roi"  # PBSD's teacher is the ROI patch feature, or the global query z_i
    patch_mode: Literal["pbsd", "multicrop"] = "pbsd"  # crops distilled, or extra positive views in the contrast
    queue_sampling: Literal["fifo", "balanced"] = "fifo"  # one FIFO, or queue_size // C slots per class
    # Strong augmentation of the contrastive CIFAR-LT peers, per-image data path only (data.pipeline: pil):
    # on the key view of the contrastive methods and on ce's one view (docs/RECIPES.md)
    strong_augment: Literal[STRONG_AUGMENTS] = "none"
    random_erasing: float = 0.0  # Cutout: torchvision's RandomErasing with this probability
    reweight: Literal["none", "effective_number"] = "none"  # class-balanced weights (Cui et al. 2019) per anchor
    reweight_beta: float = 0.9999
    knn_every: int = 1  # k-NN top-1 on the validation split every N epochs (0: never)
    knn_k: int = 20
    steps_per_epoch: int | None = None  # cap, for smoke runs; None: the whole data set


@dataclass
class LinearConfig:
    """Stage 2: a fresh linear classifier on the frozen backbone, class-balanced sampling."""

    epochs: int = 40
    batch_size: int = 2048
    lr: float = 0.1  # on standardised features (a 64-d ResNet-32); the paper used 10 on raw ResNet-50 features
    momentum: float = 0.9
    weight_decay: float = 0.0
    milestones: tuple[int, ...] = (20, 30)
    gamma: float = 0.1
    standardize: bool = True  # standardise the frozen features (statistics of the training set) before fc
    # sampler: class-balanced draws, cross-entropy (the paper's stage 2); loss: every image at its natural
    # frequency, logit-adjusted cross-entropy with tau = la_tau (Menon et al. 2021)
    rebalance: Literal["sampler", "loss"] = "sampler"
    select: Literal["best", "last"] = "best"  # the epoch kept: best validation top-1, or the last one
    la_tau: float = 1.0
    # true: each step sees fresh training-time views of its images (the paper's stage 2); false: the
    # un-augmented features are extracted once and every epoch reuses them (seconds per epoch)
    augment: bool = True
    steps_per_epoch: int | None = None


@dataclass
class LoggingConfig:
    """What a run writes besides metrics.csv, log.txt and the plots."""

    tensorboard: bool = False  # scalars per epoch and per stage-1 step into <out>/tensorboard/ (dscl[tensorboard])


@dataclass
class Config:
    method: str = "dscl+pbsd"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["fp32", "bf16"] = "fp32"  # (autocast of the networks; losses stay in float32)
    channels_last: bool = False
    compile: bool | Literal["step"] = False  # true: torch.compile the encoders; step: the whole stage-1 step
    eval_batch_size: int = 512
    checkpoint_every_steps: int = 0  # 0: once per epoch only
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def alpha(self) -> float | None:
        """The DSCL weight actually used: None unless the method is DSCL; from beta when beta is given."""
        if not self.method_spec.decoupled:
            return None
        if self.pretrain.beta is not None:
            return 1.0 / (1.0 + self.pretrain.beta)
        return self.pretrain.alpha

    @property
    def val_per_class(self) -> int:
        """Validation images per class to hold out of the training images: CIFAR-LT has no
        validation split, and no choice may look at the test split."""
        if self.data.val_per_class is not None:
            return self.data.val_per_class
        return 20 if self.data.name in ("cifar10-lt", "cifar100-lt") else 0

    @property
    def method_spec(self) -> Method:
        """What the method trains in each stage (:mod:`dscl.methods`)."""
        return get_method(self.method)

    @property
    def uses_pbsd(self) -> bool:
        return self.method_spec.patches

    def to_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@dataclass
class _Override:
    """A ``--set`` value: parsed as YAML, with the text kept for keys that take a string."""

    parsed: Any
    text: str


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a type hint, converting int to float and lists to tuples."""
    if isinstance(value, _Override):
        takes_str = hint is str or str in typing.get_args(hint)
        if takes_str and value.parsed is not None and not isinstance(value.parsed, (str, list, dict)):
            return value.text.strip()  # a folder named 2018, a name like "yes"
        value = value.parsed
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:  # a choice: the allowed values are listed once, in the field's type
        if value not in args:
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        choices = [c for a in args if typing.get_origin(a) is Literal for c in typing.get_args(a)]
        if choices:  # e.g. bool | Literal["step"]: name every accepted value
            kinds = [{"bool": "true, false"}.get(a.__name__, f"a {a.__name__}")
                     for a in args if a in (int, float, str, bool)]
            raise ConfigError(f"{key}: must be {', '.join(kinds + [str(c) for c in choices[:-1]])} or {choices[-1]}, "
                              f"got {value!r}")
        raise ConfigError(errors[0])
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if args and args[-1] is not Ellipsis and len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        item_types = [args[0]] * len(value) if args[-1:] == (Ellipsis,) else list(args)
        return tuple(_coerce(v, t, f"{key}[{n}]") for n, (v, t) in enumerate(zip(value, item_types)))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. a folder named 2018
    if (hint in (int, float, str, bool)
            and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool)))):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def _update(obj: Any, values: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            close = [n for n in names if n[:3] == str(name)[:3]]
            hint = f" (did you mean {', '.join(sorted(prefix + c for c in close))}?)" if close else ""
            raise ConfigError(f"unknown key {key!r}{hint}")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current) and isinstance(value, _Override):
            value = value.parsed
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of keys, got {value!r}")
            _update(current, value, f"{key}.")
        else:
            setattr(obj, name, _coerce(value, hints[name], key))


def validate(cfg: Config) -> Config:
    """Range checks across keys; raises ConfigError naming the key."""
    get_method(cfg.method)  # the other checks read the method's traits
    checks = [
        (cfg.pretrain.epochs >= 0, "pretrain.epochs", "must be >= 0"),
        (cfg.linear.epochs >= 0, "linear.epochs", "must be >= 0"),
        (cfg.pretrain.batch_size >= 2, "pretrain.batch_size", "must be >= 2"),
        (cfg.linear.batch_size >= 1, "linear.batch_size", "must be >= 1"),
        (cfg.pretrain.alpha is None or 0.0 <= cfg.pretrain.alpha <= 1.0, "pretrain.alpha", "must lie in [0, 1]"),
        (not cfg.method_spec.decoupled or cfg.alpha is not None, "pretrain.alpha",
         "is needed by the dscl methods (or give pretrain.beta)"),
        (cfg.pretrain.beta is None or cfg.pretrain.beta >= 0, "pretrain.beta", "must be >= 0"),
        (cfg.pretrain.la_tau >= 0 and cfg.linear.la_tau >= 0, "pretrain.la_tau / linear.la_tau", "must be >= 0"),
        (cfg.pretrain.queue_size >= cfg.pretrain.batch_size, "pretrain.queue_size",
         f"must be at least the batch size ({cfg.pretrain.batch_size})"),
        (0.0 <= cfg.pretrain.ema_momentum < 1.0, "pretrain.ema_momentum", "must lie in [0, 1)"),
        (cfg.pretrain.temperature > 0, "pretrain.temperature", "must be > 0"),
        (cfg.pretrain.pbsd_weight >= 0, "pretrain.pbsd_weight", "must be >= 0"),
        (cfg.pretrain.pbsd_teacher_temperature is None or cfg.pretrain.pbsd_teacher_temperature > 0,
         "pretrain.pbsd_teacher_temperature", "must be > 0 (or null)"),
        (cfg.pretrain.num_patches >= 1, "pretrain.num_patches", "must be >= 1"),
        (0 < cfg.pretrain.patch_scale[0] <= cfg.pretrain.patch_scale[1] <= 1, "pretrain.patch_scale",
         "must be 0 < low <= high <= 1"),
        (cfg.pretrain.lr > 0 and cfg.linear.lr > 0, "pretrain.lr / linear.lr", "must be > 0"),
        (cfg.pretrain.warmup_epochs >= 0, "pretrain.warmup_epochs", "must be >= 0"),
        (cfg.pretrain.key_bn_groups >= 1, "pretrain.key_bn_groups", "must be >= 1"),
        (cfg.pretrain.knn_every >= 0, "pretrain.knn_every", "must be >= 0"),
        (cfg.pretrain.knn_k >= 1, "pretrain.knn_k", "must be >= 1"),
        (cfg.data.imbalance_ratio is None or cfg.data.imbalance_ratio >= 1, "data.imbalance_ratio", "must be >= 1"),
        (cfg.data.val_per_class is None or cfg.data.val_per_class >= 0, "data.val_per_class", "must be >= 0"),
        (cfg.data.test_folder == "test" or cfg.data.name == "imagefolder", "data.test_folder",
         f"applies to data.name: imagefolder only (data.name is {cfg.data.name})"),
        (re.fullmatch(r"[^/\\]+", cfg.data.test_folder) is not None
         and cfg.data.test_folder not in (".", "..", "train"),
         "data.test_folder", f"must name one folder under data.root other than train (e.g. test or val), "
         f"got {cfg.data.test_folder!r}"),
        (cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0"),
        (0.0 <= cfg.pretrain.reweight_beta < 1.0, "pretrain.reweight_beta", "must lie in [0, 1)"),
        (0.0 <= cfg.pretrain.random_erasing <= 1.0, "pretrain.random_erasing", "must lie in [0, 1]"),
        (cfg.uses_pbsd or (cfg.pretrain.pbsd_teacher == "roi" and cfg.pretrain.patch_mode == "pbsd"),
         "pretrain.pbsd_teacher / pretrain.patch_mode", f"change the patch term, which method {cfg.method!r} has not "
         "(use scl+pbsd or dscl+pbsd)"),
        (cfg.checkpoint_every_steps >= 0, "checkpoint_every_steps", "must be >= 0"),
        (cfg.eval_batch_size >= 1, "eval_batch_size", "must be >= 1"),
        (cfg.data.image_size is None or cfg.data.image_size >= 8, "data.image_size", "must be >= 8"),
        (cfg.model.feature_dim >= 1, "model.feature_dim", "must be >= 1"),
        (cfg.model.experts >= 1, "model.experts", "must be >= 1"),
        (cfg.model.expert_width > 0, "model.expert_width", "must be > 0"),
        (cfg.model.experts == 1 or cfg.method_spec.contrastive, "model.experts",
         f"needs a contrastive method: {cfg.method} trains one network end to end (see docs/RECIPES.md)"),
        (cfg.pretrain.patch_size is None or cfg.pretrain.patch_size >= 1, "pretrain.patch_size", "must be >= 1"),
        (cfg.pretrain.crop_scale is None or 0 < cfg.pretrain.crop_scale[0] <= cfg.pretrain.crop_scale[1] <= 1,
         "pretrain.crop_scale", "must be 0 < low <= high <= 1"),
        (cfg.pretrain.steps_per_epoch is None or cfg.pretrain.steps_per_epoch >= 1, "pretrain.steps_per_epoch",
         "must be >= 1 (or null)"),
        (cfg.linear.steps_per_epoch is None or cfg.linear.steps_per_epoch >= 1, "linear.steps_per_epoch",
         "must be >= 1 (or null)"),
        (re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", cfg.device) is not None, "device",
         "must be auto, cpu, cuda, cuda:N or mps"),
    ]
    for section in ("pretrain", "linear"):
        sub = getattr(cfg, section)
        checks += [
            (sub.weight_decay >= 0, f"{section}.weight_decay", "must be >= 0"),
            (0 <= sub.momentum < 1, f"{section}.momentum", "must lie in [0, 1)"),
            (math.isfinite(sub.lr), f"{section}.lr", "must be finite"),
        ]
    for ok, key, message in checks:
        if not ok:
            raise ConfigError(f"{key}: {message}")
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], the value parsed as YAML, with its text kept)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    value = _safe_yaml(raw) if raw.strip() else None
    if isinstance(value, _Unparsed):
        value = raw  # not YAML: keep the text; the key's type decides whether it is acceptable
    return key.strip().split("."), _Override(value, raw)


class _Unparsed:
    def __init__(self, error: Exception):
        self.error = error


def _safe_yaml(text: str):
    """``yaml.safe_load`` that returns _Unparsed for any failure: PyYAML raises more than
    YAMLError on odd input (ValueError for 2001-02-30, RecursionError for deep nesting...)."""
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError) as exc:
        return _Unparsed(exc)


def _read_recipe(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file: {exc}") from exc
    values = _safe_yaml(text)
    if isinstance(values, _Unparsed):
        raise ConfigError(f"{path}: not valid YAML: {values.error}")
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys, got {type(values).__name__}")
    return values


def _recipe_chain(path: Path, children: tuple[Path, ...] = ()) -> list[tuple[Path, dict]]:
    """The recipe at ``path`` and the recipes it inherits from (``base: FILE``, relative to the
    file), base first: each states only what differs from its base."""
    if path.resolve() in children:
        raise ConfigError(f"{path}: inherits from itself (base chain {' -> '.join(map(str, children))})")
    values = _read_recipe(path)
    base = values.pop("base", None)
    if base is None:
        return [(path, values)]
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected the file name of another recipe, got {base!r}")
    try:
        chain = _recipe_chain(path.parent / base, (*children, path.resolve()))
    except ConfigError as exc:
        raise ConfigError(f"{path}: base {base}: {exc}") from None
    return [*chain, (path, values)]


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """Defaults, then ``base`` (a dict), then the YAML file (after the recipes it inherits from
    with ``base: FILE``), then each ``key=value`` override."""
    cfg = Config()
    if base:
        _update(cfg, base)
    if path is not None:
        path = Path(path)
        for layer, values in _recipe_chain(path):
            try:
                _update(cfg, values)
            except ConfigError as exc:
                raise ConfigError(f"{layer}: {exc}") from exc
    for text in overrides:
        keys, value = parse_override(text)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        try:
            _update(cfg, nested)
        except ConfigError as exc:
            raise ConfigError(f"--set: {exc}") from exc
    if cfg.data.imbalance_ratio is None:  # written out, so a run's config.yaml says what it trained on
        cfg.data.imbalance_ratio = default_ratio(cfg.data.name)
    try:
        return validate(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path is not None else str(exc)) from exc


def flatten_config(config: dict, prefix: str = "") -> dict:
    """A nested config dict as ``{"dotted.key": value}`` (tuples as lists)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = list(value) if isinstance(value, tuple) else value
    return flat


def config_from_dict(values: dict) -> Config:
    """Rebuild a config saved with :meth:`Config.to_dict` (e.g. from a run's config.yaml)."""
    return load_config(base=values)
