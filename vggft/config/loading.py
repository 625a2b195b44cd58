"""Loading a configuration: defaults in one place, then a YAML file, then ``--set`` overrides.

``load_config`` reads YAML with the safe loader, applies ``KEY=VALUE`` overrides, converts each value to the
field's declared type (``config.schema``) and checks it. Anything wrong is one ``ConfigError`` line that
names the key, what was expected and what was given.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import reprlib
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from vggft.config.schema import Config, DataConfig, ModelConfig, TrainConfig, all_keys, describe_type
from vggft.utils.errors import ConfigError

# Keys renamed since a config could first be saved: old dotted key -> new dotted key. Saved sidecars and
# checkpoints store their config and are re-read by the strict loader, so a rename must be listed here.
RENAMED_KEYS: dict[str, str] = {}


# What can still take effect when a run goes on from its last.pt: anything else would be recorded in
# config.yaml and the sidecar without having changed the training (the optimizer state holds the lr, ...).
RESUMABLE_KEYS = (
    "train.epochs",
    "train.early_stopping.patience",
    "train.device",
    "output.weights",
    "data.num_workers",
    "data.eval_batch_size",
    "cache.enabled",
    "cache.dir",
    "train.calibrate",
)


MAX_CONFIG_BYTES = 1 << 20  # a config is a page of keys; anything larger is not one


def migrate_config(raw: dict[str, Any], note=None) -> dict[str, Any]:
    """``raw`` with renamed keys moved to their new names (``note(old, new)`` is told of each)."""
    for old, new in RENAMED_KEYS.items():
        *parents, leaf = old.split(".")
        node: Any = raw  # a nested section, or anything a hand-written file put there
        for name in parents:
            node = node.get(name) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            value = node.pop(leaf)
            _set_dotted(raw, new, value)
            if note is not None:
                note(old, new)
    return raw


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), base: dict | None = None) -> Config:
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
        origins[key] = origin(override)
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
        raise ConfigError(
            f"{source}: nested too deeply to be a vggft config; see vggft configs --defaults for the shape"
        ) from None
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
        return "data.resize", (
            f": {d.resize} is smaller than data.image_size {d.image_size} (the crop would be "
            f"padded with black); set resize to {d.image_size} or more, or null"
        )
    if t.head_only_epochs and not m.unfreeze:
        return "train.head_only_epochs", (
            f": {t.head_only_epochs} does nothing without model.unfreeze (nothing to "
            "thaw later); set model.unfreeze, or head_only_epochs: 0"
        )
    if t.head_only_epochs and t.head_only_epochs >= t.epochs:
        return "train.head_only_epochs", (
            f": {t.head_only_epochs} leaves no epoch of the {t.epochs} for the "
            "unfrozen blocks; raise train.epochs or lower head_only_epochs"
        )
    if t.backbone_lr is not None and not m.unfreeze:
        return "train.backbone_lr", (
            " does nothing while the backbone is frozen; set model.unfreeze, or remove backbone_lr"
        )
    if t.warmup_epochs and t.scheduler == "onecycle":
        return "train.warmup_epochs", (
            " does nothing with scheduler onecycle (it warms up by itself); remove "
            "warmup_epochs, or use scheduler cosine or step"
        )
    if t.warmup_epochs and t.warmup_epochs >= t.epochs and t.scheduler != "none":
        return "train.warmup_epochs", (
            f": {t.warmup_epochs} is the whole run of {t.epochs} epoch(s); lower it or raise train.epochs"
        )
    if t.nesterov and (t.optimizer != "sgd" or t.momentum == 0):
        return "train.nesterov", (
            f" needs optimizer sgd with momentum > 0 (got {t.optimizer}, momentum "
            f"{t.momentum:g}); set train.momentum, e.g. 0.9"
        )
    if t.momentum and t.optimizer != "sgd":
        return "train.momentum", f" is an sgd setting; {t.optimizer} ignores it; remove it"
    return None


def resume_overrides_refused(overrides: list[str]) -> None:
    """On --resume only keys that can still take effect are accepted."""
    for override in overrides:
        key, _ = parse_override(override)
        if key not in RESUMABLE_KEYS:
            named = f"--set {key}" if origin(override) == "--set" else f"{origin(override)} ({key})"
            raise ConfigError(
                f"{named}: cannot change when resuming (the run's optimizer, data and model were set up with "
                f"the old value); resume accepts {', '.join(RESUMABLE_KEYS)}; start a new run to change {key}"
            )


class Override(str):
    """A ``KEY=VALUE`` that came from a short flag (``--lr 0.01`` is ``train.lr=0.01``): errors name ``flag``
    where a ``--set`` would be named; ``literal`` takes the value as written (a path), not as YAML."""

    flag: str
    literal: bool

    def __new__(cls, key: str, value: str, flag: str, literal: bool = False) -> Override:
        override = super().__new__(cls, f"{key}={value}")
        override.flag, override.literal = flag, literal
        return override


def origin(override: str) -> str:
    """What an override is called in messages: its short flag, or --set."""
    return getattr(override, "flag", "--set")


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.epochs=1")
    if getattr(text, "literal", False):
        return key, value
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key, parsed


class _RepeatedKey(Exception):
    def __init__(self, key: str, first: int, again: int):
        super().__init__(key)
        self.key, self.first, self.again = key, first, again


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key written twice in one mapping: PyYAML keeps the later silently, so
    a second ``train:`` section would drop the whole first one. Keys brought in by a merge (``<<: *base``)
    may still be overridden, as YAML means them to be."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            line = key_node.start_mark.line + 1
            if key_node.value in seen:
                raise _RepeatedKey(key_node.value, seen[key_node.value], line)
            seen[key_node.value] = line
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        from vggft.config.presets import find, names

        hint = f"; the preset of that name is --config {path.stem}" if find(path.name) else ""
        raise ConfigError(
            f"{path}: config file not found{hint}; pass an existing YAML file to --config, or a "
            f"preset name ({', '.join(names())}; vggft configs lists them)"
        )
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{path}: {path.stat().st_size:,} bytes is too large for a config "
            f"(at most {MAX_CONFIG_BYTES:,}); pass the YAML file of settings"
        )
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # a SafeLoader: no objects
    except _RepeatedKey as err:
        raise ConfigError(
            f"{path}: line {err.again}: '{err.key}' is given again (first at line {err.first}), and the later "
            "one would silently replace the earlier; keep one of them"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file; --config takes a YAML file") from None
    except RecursionError:
        raise ConfigError(
            f"{path}: nested too deeply to be a vggft config; see vggft configs --defaults for the shape"
        ) from None
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
        section = prefix.rstrip(".")
        meant = FOREIGN_KEYS.get(section, "")
        hint = f"; did you mean '{meant}'?" if meant.startswith(f"{section}.") else ""
        where = origins.get(section, source)
        raise ConfigError(f"{where}: {section}: expected a mapping of keys, got {_show(raw)}{hint}")
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
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
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


# What other tools call a setting (Ultralytics, timm, Keras, Lightning, torchvision's reference scripts) ->
# the vggft key it means: spelling-alike matching would answer 'learning_rate' with 'train.calibrate'.
FOREIGN_KEYS = {
    **dict.fromkeys(("learning_rate", "lr0", "base_lr", "lr"), "train.lr"),
    **dict.fromkeys(("imgsz", "img_size", "input_size", "size", "resolution", "image_size"), "data.image_size"),
    **dict.fromkeys(("batch", "bs", "batch_size", "train_batch_size"), "data.batch_size"),
    **dict.fromkeys(("epochs", "num_epochs", "max_epochs", "n_epochs"), "train.epochs"),
    **dict.fromkeys(("device", "devices", "gpu", "gpus", "accelerator"), "train.device"),
    **dict.fromkeys(("arch", "architecture", "backbone", "model_name"), "model.arch"),
    **dict.fromkeys(("pretrained", "weights", "checkpoint"), "model.weights"),
    **dict.fromkeys(("data", "data_dir", "dataset", "root", "data_path", "directory"), "data.root"),
    **dict.fromkeys(("opt", "optim", "optimizer"), "train.optimizer"),
    **dict.fromkeys(("wd", "weight_decay"), "train.weight_decay"),
    **dict.fromkeys(("workers", "num_workers", "j"), "data.num_workers"),
    **dict.fromkeys(("nc", "num_classes"), "model.num_classes"),
    **dict.fromkeys(("sched", "lr_scheduler", "scheduler"), "train.scheduler"),
    **dict.fromkeys(("smoothing", "label_smoothing"), "train.label_smoothing"),
    **dict.fromkeys(("mixed_precision", "precision", "amp"), "train.amp"),
    "patience": "train.early_stopping.patience",
    "drop": "model.dropout",
    "model": "model.arch",  # Ultralytics' model=yolov8n-cls.pt, timm's --model vgg16
}


def _suggest(name: str, cls: type, prefix: str) -> str:
    """'; did you mean ...?' from other tools' names for a setting, then the keys of this section, then every
    key (a key in the wrong section)."""
    foreign = FOREIGN_KEYS.get(name.rsplit(".", 1)[-1].lower().replace("-", "_"))
    if foreign is not None and foreign != name:
        return f"; did you mean '{foreign}'?"
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
        why = _not_finite(value) if _takes_numbers(hint) else ""
        raise ConfigError(f"{source}: {key}: expected {describe_type(hint)}, got {_show(value)}{why}")
    return result


def _takes_numbers(hint: Any) -> bool:
    if typing.get_origin(hint) in (Union, types.UnionType):
        return any(_takes_numbers(option) for option in typing.get_args(hint))
    return hint in (int, float)


def _not_finite(value: Any) -> str:
    """Why a number is refused all the same: 1e400 overflows (float reads it as inf); inf and nan are no amounts."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return ""
    try:
        number = float(value)
    except ValueError:
        return ""
    except OverflowError:  # an int beyond any float
        number = math.inf
    if math.isinf(number) and not (isinstance(value, float) or "inf" in str(value).lower()):
        return f", which overflows (numbers stop at ±{sys.float_info.max:.1e})"
    return ", which is not a finite number" if not math.isfinite(number) else ""


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


_SHOW = reprlib.Repr()


_SHOW.maxlevel, _SHOW.maxlist, _SHOW.maxdict, _SHOW.maxstring, _SHOW.maxother = 2, 4, 4, 50, 50


def _show(value: Any) -> str:
    """A short repr, bounded in time and length however large or self-referential the value (YAML anchors)."""
    text = _SHOW.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
