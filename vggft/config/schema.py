"""Typed configuration: defaults in one place, then a YAML file, then ``--set`` overrides.

Every key lives in one of the dataclasses below with its default; ``load_config``
reads YAML with the safe loader, applies ``KEY=VALUE`` overrides, converts each
value to the field's declared type and checks it. Anything wrong is one
``ConfigError`` line that names the key, what was expected and what was given.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from vggft.utils.errors import ConfigError

ARCHS = ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn")
Arch = Literal["vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"]


def _positive(value: Any) -> str | None:
    return None if value > 0 else "a number greater than 0"


def _non_negative(value: Any) -> str | None:
    return None if value >= 0 else "a number of 0 or more"


MIN_IMAGE_SIZE = 32  # VGG's five max-pools halve the input five times: 32 px is the least that leaves a pixel


def _image_size(value: Any) -> str | None:
    return None if value >= MIN_IMAGE_SIZE else f"{MIN_IMAGE_SIZE} or more (VGG's five max-pools halve it to 1 px)"


def _workers(value: Any) -> str | None:
    return None if value == "auto" or value >= 0 else "'auto' or a number of 0 or more"


def _fraction(value: Any) -> str | None:
    return None if 0 <= value < 1 else "a fraction from 0 up to (not including) 1"


MAX_SEED = 2**63 - 1  # torch and numpy seed from 64 bits; a rank and epoch are added under torchrun


def _seed(value: int) -> str | None:
    return None if 0 <= value <= MAX_SEED else f"a whole number from 0 to {MAX_SEED}"


def _split(value: list[float]) -> str | None:
    if len(value) != 3 or any(part < 0 for part in value) or abs(sum(value) - 1) > 1e-6:
        return "three fractions [train, val, test] that add up to 1, e.g. [0.8, 0.1, 0.1]"
    if value[0] <= 0 or value[2] <= 0:
        return "a split with a non-zero train and test fraction"
    return None


DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _device(value: str) -> str | None:
    """Spelling only (torch-free); whether the device is present is asked when it is used."""
    return None if DEVICE.fullmatch(value.strip().lower()) else "auto, cpu, cuda, cuda:N or mps"


def _check(check, **kwargs) -> Any:
    """A dataclass field with a validity check run after type conversion."""
    return field(metadata={"check": check}, **kwargs)


@dataclass
class DataConfig:
    root: str = "data/pet"
    """Holds train/ and test/ (optionally val/) of class folders, or one pool of class folders."""
    image_size: int = _check(_image_size, default=224)
    """Side of the square the network sees, in pixels (32 or more: VGG halves it five times)."""
    resize: int | None = _check(_positive, default=256)
    """Shorter side is resized to this, then centre-cropped to image_size; null squashes
    the whole image to image_size x image_size (the Keras recipe)."""
    normalize: Literal["imagenet", "symmetric"] = "imagenet"
    """imagenet: torchvision's mean/std; symmetric: pixels scaled to [-1, 1]."""
    batch_size: int = _check(_positive, default=4)
    """Training batch size (per process under torchrun)."""
    eval_batch_size: int = _check(_positive, default=32)
    """Batch size of feature extraction and evaluation: no gradients, so it can be larger."""
    num_workers: int | Literal["auto"] = _check(_workers, default="auto")
    """DataLoader worker processes; auto: the cores on CUDA, none on a small CPU."""
    decode: Literal["auto", "pil", "gpu"] = "auto"
    """How feature extraction decodes images. pil: Pillow in the DataLoader workers. gpu: the workers read
    file bytes; batches of JPEGs are decoded by torchvision.io.decode_jpeg on the device and resized,
    cropped and normalised there as tensors (without CUDA the same tensor path runs on the CPU); a file it
    cannot take (PNG, CMYK, progressive, EXIF-rotated, rejected) goes through Pillow, counted in a note.
    auto: gpu on CUDA, pil elsewhere. Part of the feature-cache key (tensor resizing differs slightly
    from Pillow's); training on decoded images (cache off) always uses Pillow."""
    split: list[float] = _check(_split, default_factory=lambda: [0.8, 0.1, 0.1])
    """How a single pool of class folders is split into train/val/test (stratified)."""
    split_seed: int = 0
    """Seed of the pool split (and of carving val_fraction out of train)."""
    val_fraction: float = _check(_fraction, default=0.0)
    """Carve this fraction of train out as validation when there is no val split."""
    bad_images: Literal["skip", "error"] = "skip"
    """Unreadable images: skip them (reported once), or stop before any training."""
    balance: Literal["none", "weights", "sampler"] = "none"
    """Class imbalance: weights (class-weighted loss) or sampler (weighted sampling)."""
    augment: Literal["none", "light", "strong"] = "none"
    """Training augmentation: light (random resized crop, flip) or strong (wider crop, colour jitter,
    rotation); either turns the feature cache off."""


@dataclass
class ModelConfig:
    arch: Arch = "vgg16"
    """The torchvision VGG architecture; _bn: with batch norm."""
    weights: str | None = "IMAGENET1K_V1"
    """A torchvision weights name (IMAGENET1K_V1, DEFAULT), a local .pth state_dict, or null."""
    head: Literal["classifier6", "gap"] = "classifier6"
    """classifier6: VGG's last Linear swapped for n outputs (the PyTorch tutorial); gap: global average
    pool, Linear(512, 512), ReLU, Linear(512, n) (the Keras tutorial)."""
    num_classes: int | None = _check(_positive, default=None)
    """null: the number of class folders in the training split."""
    dropout: float = _check(_fraction, default=0.5)
    """Dropout of VGG's classifier (0.5 in torchvision); applies to the classifier6 head."""
    unfreeze: list[str] | int = 0
    """Conv blocks to train too: a list such as [block5], or a count from the top."""


def weights_is_file(weights: str) -> bool:
    """Whether a ``model.weights`` value names a file (a .pth/.pt/.bin name, a path, or anything that exists)
    rather than a torchvision weights name such as IMAGENET1K_V1."""
    path = Path(weights).expanduser()
    return path.suffix in (".pth", ".pt", ".bin") or os.sep in weights or path.exists()


@dataclass
class EarlyStoppingConfig:
    patience: int | None = _check(_positive, default=None)
    """Stop after this many epochs without a better val accuracy; null: never."""


@dataclass
class TrainConfig:
    epochs: int = _check(_positive, default=5)
    """Passes over the training split."""
    lr: float = _check(_positive, default=1.0e-4)
    """Learning rate of the head."""
    backbone_lr: float | None = _check(_positive, default=None)
    """Learning rate of unfrozen backbone blocks; null: lr / 10."""
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    momentum: float = _check(_non_negative, default=0.0)
    """SGD momentum."""
    nesterov: bool = False
    """Nesterov momentum (sgd with momentum > 0)."""
    weight_decay: float = _check(_non_negative, default=0.0)
    scheduler: Literal["none", "cosine", "step", "onecycle"] = "none"
    """cosine: to 0 over the epochs after warmup; step: x gamma every step_size epochs; onecycle: torch's
    OneCycleLR peaking at lr. All step every batch."""
    warmup_epochs: int = _check(_non_negative, default=0)
    """Linear warmup from 0 to lr over this many epochs (cosine, step)."""
    step_size: int = _check(_positive, default=10)
    """Epochs between learning-rate drops of scheduler step."""
    gamma: float = _check(_positive, default=0.1)
    """Factor of each drop of scheduler step."""
    label_smoothing: float = _check(_fraction, default=0.0)
    """Cross-entropy label smoothing."""
    grad_clip: float | None = _check(_positive, default=None)
    """Largest gradient norm; null: no clipping."""
    early_stopping: EarlyStoppingConfig = field(default_factory=lambda: EarlyStoppingConfig())
    head_only_epochs: int = _check(_non_negative, default=0)
    """Two-stage fine-tuning: train the head alone this many epochs, then the model.unfreeze blocks too."""
    seed: int = _check(_seed, default=0)
    """Seeds the head's initialisation, shuffling and dropout."""
    device: str = _check(_device, default="auto")
    """auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps."""
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    """Autocast: auto is bf16 (or fp16) on CUDA and fp32 on CPU; off: always fp32."""
    calibrate: bool = True
    """Fit a softmax temperature on the val split after training (Guo et al. 2017) and store it in the
    sidecar, so that predict reports calibrated probabilities; needs a val split. false: don't."""


@dataclass
class CacheConfig:
    enabled: bool = True
    """Cache the frozen prefix's features on disk; `cache: off` is short for enabled: false."""
    dir: str | None = None
    """null: $VGGFT_CACHE, else $XDG_CACHE_HOME/vggft, else ~/.cache/vggft."""


@dataclass
class OutputConfig:
    weights: str = "models/VGG16.pt"
    """The plain state_dict; a sidecar with the same stem and .json records the rest."""
    runs_dir: str = "runs"
    """Each train writes runs_dir/<name>/: config, metrics.csv, last.pt, best.pt, plots."""
    name: str | None = None
    """Run folder name; null: train, train2, train3, ..."""
    tensorboard: bool = False
    """Also write the epoch scalars of metrics.csv, the curves and the test confusion matrix as TensorBoard
    events under the run folder's tensorboard/ (needs the tensorboard package: pip install 'vggft[tensorboard]')."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Keys renamed since a config could first be saved: old dotted key -> new dotted key. Saved sidecars and
# checkpoints store their config and are re-read by the strict loader, so a rename must be listed here.
RENAMED_KEYS: dict[str, str] = {}

# What can still take effect when a run goes on from its last.pt: anything else would be recorded in
# config.yaml and the sidecar without having changed the training (the optimizer state holds the lr, ...).
RESUMABLE_KEYS = ("train.epochs", "train.early_stopping.patience", "train.device", "output.weights",
                  "data.num_workers", "data.eval_batch_size", "cache.enabled", "cache.dir", "train.calibrate")

MAX_CONFIG_BYTES = 1 << 20  # a config is a page of keys; anything larger is not one


def migrate_config(raw: dict[str, Any], note=None) -> dict[str, Any]:
    """``raw`` with renamed keys moved to their new names (``note(old, new)`` is told of each)."""
    for old, new in RENAMED_KEYS.items():
        *parents, leaf = old.split(".")
        node = raw
        for name in parents:
            node = node.get(name) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            value = node.pop(leaf)
            _set_dotted(raw, new, value)
            if note is not None:
                note(old, new)
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """Defaults, then ``base`` (a resolved config from a sidecar), then the YAML file, then overrides.

    An error names where the bad value came from: the file, or ``--set``.
    """
    raw: dict[str, Any] = {}
    if base:
        _merge(raw, migrate_config(copy.deepcopy(base)))  # a copy: --set must not write into the caller's dict
    source = "--set" if overrides else "config"  # what the consistency checks name when no file was given
    if path is not None:
        path, source = config_file(path)
        _merge(raw, migrate_config(_read_yaml(path), _renamed_note(source)))
    origins = {}
    for override in overrides:
        key, value = parse_override(override)
        key = RENAMED_KEYS.get(key, key)
        _set_dotted(raw, key, value)
        origins[key] = "--set"
    return config_from_dict(raw, source, origins)


def config_file(path: str | Path) -> tuple[Path, str]:
    """(file, name for messages) of ``--config``: a file, else a preset of that name (``--config pet``)."""
    path = Path(path)
    if not path.is_file() and path.parent == Path("."):
        from vggft.config.presets import find

        preset = find(path.name)
        if preset is not None:
            return preset, f"preset {preset.stem}"
    return path, str(path)


def _renamed_note(source: str):
    def note(old: str, new: str) -> None:
        import logging

        logging.getLogger("vggft").warning(f"{source}: '{old}' is now called '{new}'; rename it there")

    return note


def config_from_dict(raw: dict[str, Any], source: str = "config", origins: dict[str, str] | None = None) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (data, model, train, ...), got {_show(raw)}")
    raw = dict(raw)
    if isinstance(raw.get("cache"), (bool, str)):
        raw["cache"] = {"enabled": raw["cache"]}
    try:
        cfg = _build(Config, raw, prefix="", source=source, origins=origins or {})
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a vggft config; see vggft configs --defaults for the shape") from None
    check_consistency(cfg, source, origins)
    return cfg


def check_consistency(cfg: Config, source: str = "config", origins: dict[str, str] | None = None) -> None:
    """Settings that would silently do nothing are refused, naming the key, where it came from (the file, or
    ``--set``: ``origins``) and what would make it work."""
    t, m, d = cfg.train, cfg.model, cfg.data
    problem = _inconsistency(t, m, d)
    if problem is not None:
        key, text = problem
        raise ConfigError(f"{(origins or {}).get(key, source)}: {key}{text}")


def _inconsistency(t: TrainConfig, m: ModelConfig, d: DataConfig) -> tuple[str, str] | None:
    """(key, the rest of the message) of the first setting that would do nothing, or None."""
    if d.resize is not None and d.resize < d.image_size:
        return "data.resize", (f": {d.resize} is smaller than data.image_size {d.image_size} (the crop would be "
                               f"padded with black); set resize to {d.image_size} or more, or null")
    if t.head_only_epochs and not m.unfreeze:
        return "train.head_only_epochs", (f": {t.head_only_epochs} does nothing without model.unfreeze (nothing to "
                                          "thaw later); set model.unfreeze, or head_only_epochs: 0")
    if t.head_only_epochs and t.head_only_epochs >= t.epochs:
        return "train.head_only_epochs", (f": {t.head_only_epochs} leaves no epoch of the {t.epochs} for the "
                                          "unfrozen blocks; raise train.epochs or lower head_only_epochs")
    if t.backbone_lr is not None and not m.unfreeze:
        return "train.backbone_lr", (" does nothing while the backbone is frozen; set model.unfreeze, or remove "
                                     "backbone_lr")
    if t.warmup_epochs and t.scheduler == "onecycle":
        return "train.warmup_epochs", (" does nothing with scheduler onecycle (it warms up by itself); remove "
                                       "warmup_epochs, or use scheduler cosine or step")
    if t.warmup_epochs and t.warmup_epochs >= t.epochs and t.scheduler != "none":
        return "train.warmup_epochs", (f": {t.warmup_epochs} is the whole run of {t.epochs} epoch(s); lower it "
                                       "or raise train.epochs")
    if t.nesterov and (t.optimizer != "sgd" or t.momentum == 0):
        return "train.nesterov", (f" needs optimizer sgd with momentum > 0 (got {t.optimizer}, momentum "
                                  f"{t.momentum:g}); set train.momentum, e.g. 0.9")
    if t.momentum and t.optimizer != "sgd":
        return "train.momentum", f" is an sgd setting; {t.optimizer} ignores it; remove it"
    return None


def resume_overrides_refused(overrides: list[str]) -> None:
    """On --resume only keys that can still take effect are accepted."""
    for override in overrides:
        key, _ = parse_override(override)
        if key not in RESUMABLE_KEYS:
            raise ConfigError(
                f"--set {key}: cannot change when resuming (the run's optimizer, data and model were set up with "
                f"the old value); resume accepts {', '.join(RESUMABLE_KEYS)}; start a new run to change {key}"
            )


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.epochs=1")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key, parsed


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        from vggft.config.presets import find, names

        hint = f"; the preset of that name is --config {path.stem}" if find(path.name) else ""
        raise ConfigError(f"{path}: config file not found{hint}; pass an existing YAML file to --config, or a "
                          f"preset name ({', '.join(names())}; vggft configs lists them)")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size:,} bytes is too large for a config "
                          f"(at most {MAX_CONFIG_BYTES:,}); pass the YAML file of settings")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file; --config takes a YAML file") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a vggft config; see vggft configs --defaults for the shape") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}:{where}: {problem}; fix the YAML syntax there") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data, model, train, ...), got {_show(data)}")
    return data


def _merge(into: dict, other: dict) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = raw
    for name in parents:
        child = node.get(name)
        if not isinstance(child, dict):
            child = {} if child is None else {"enabled": child} if name == "cache" else child
            if not isinstance(child, dict):
                raise ConfigError(f"--set {dotted}: '{name}' is not a section")
            node[name] = child
        node = child
    node[last] = value


def _build(cls: type, raw: Any, prefix: str, source: str, origins: dict[str, str]) -> Any:
    if not isinstance(raw, dict):
        where = origins.get(prefix.rstrip("."), source)
        raise ConfigError(f"{where}: {prefix.rstrip('.')}: expected a mapping of keys, got {_show(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            where = origins.get(f"{prefix}{key}", source)
            raise ConfigError(f"{where}: unknown key '{prefix}{key}'{_suggest(f'{prefix}{key}', cls, prefix)}")
    values = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        key = f"{prefix}{name}"
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, raw[name] if raw[name] is not None else {}, f"{key}.", source, origins)
            continue
        where = origins.get(key, source)
        value = _convert(raw[name], hint, key, where)
        check = f.metadata.get("check")
        if check is not None and value is not None:
            problem = check(value)
            if problem:
                raise ConfigError(f"{where}: {key}: expected {problem}, got {_show(raw[name])}")
        values[name] = value
    return cls(**values)


def all_keys(cls: type = None, prefix: str = "") -> list[str]:
    """Every dotted key of the config, e.g. 'train.epochs'."""
    cls = cls or Config
    keys = []
    for name, hint in typing.get_type_hints(cls).items():
        keys += all_keys(hint, f"{prefix}{name}.") if dataclasses.is_dataclass(hint) else [f"{prefix}{name}"]
    return keys


def _suggest(name: str, cls: type, prefix: str) -> str:
    """'; did you mean ...?' from the keys of this section, then from every key (a key in the wrong section)."""
    section = [f"{prefix}{f.name}" for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(name, section, n=1)
    if not close:
        leaf = name.rsplit(".", 1)[-1]
        everywhere = all_keys()
        close = [k for k in everywhere if k.rsplit(".", 1)[-1] == leaf] or difflib.get_close_matches(
            name, everywhere, n=1, cutoff=0.7
        )
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; valid keys here: {', '.join(section)}"


_NO = object()


def _convert(value: Any, hint: Any, key: str, source: str) -> Any:
    result = _try_convert(value, hint)
    if result is _NO:
        raise ConfigError(f"{source}: {key}: expected {describe_type(hint)}, got {_show(value)}")
    return result


def _try_convert(value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        # Try the exact type first so that `3` stays an int in `int | Literal['auto']`.
        for option in typing.get_args(hint):
            result = _try_convert(value, option)
            if result is not _NO:
                return result
        return _NO
    if hint is type(None):
        return None if value is None or (isinstance(value, str) and value.lower() in ("null", "none")) else _NO
    if origin is Literal:
        allowed = typing.get_args(hint)
        if isinstance(value, bool):  # YAML 1.1 reads off/on/no/yes as booleans
            value = {False: "off", True: "on"}[value]
            if value not in allowed and value == "off" and "none" in allowed:
                value = "none"
        if isinstance(value, str) and value.lower() in [str(a).lower() for a in allowed]:
            return next(a for a in allowed if str(a).lower() == value.lower())
        return _NO
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            return _NO
        items = [_try_convert(v, item) for v in value]
        return _NO if any(i is _NO for i in items) else items
    return _convert_scalar(value, hint)


def _convert_scalar(value: Any, hint: Any) -> Any:
    """bool, int, float or str from what YAML (or --set) made of the text."""
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "false", "no", "off"):
            return value.lower() in ("true", "yes", "on")
        return _NO
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return _NO
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            return _NO
        try:  # PyYAML reads 1e-4 (no decimal point) as a string
            number = float(value)
        except (ValueError, OverflowError):
            return _NO
        return number if math.isfinite(number) else _NO
    if hint is str:
        if isinstance(value, str) and value:
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        return _NO
    raise TypeError(f"unsupported config type {hint!r}")


def describe_type(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(describe_type(option) for option in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin is list:
        item = describe_type(typing.get_args(hint)[0])
        return f"a list of {item.removeprefix('a ')}s"
    return {bool: "true/false", int: "a whole number", float: "a number", str: "a non-empty string"}[hint]


_SHOW = reprlib.Repr()
_SHOW.maxlevel, _SHOW.maxlist, _SHOW.maxdict, _SHOW.maxstring, _SHOW.maxother = 2, 4, 4, 50, 50


def _show(value: Any) -> str:
    """A short repr, bounded in time and length however large or self-referential the value (YAML anchors)."""
    text = _SHOW.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
