"""What a sweep will try, decided before torch is imported: ``--grid``/``--range`` parsed, the keys checked,
the trials laid out (every grid combination, or seeded random draws), each trial's config built and checked.

Only keys that leave the cached rows alone can be swept: ``train.*`` (not ``train.amp``, whose precision
decides the rows, nor ``train.device``), ``data.batch_size`` and ``data.balance``. Anything else would
need a new extraction per trial or would score trials on different data.
"""

from __future__ import annotations

import difflib
import itertools
import math
import random
import types
import typing
from dataclasses import dataclass
from typing import Union

from vggft.config.loading import load_config
from vggft.config.schema import Config, all_keys
from vggft.utils.errors import ConfigError

SWEEPABLE_OUTSIDE_TRAIN = ("data.batch_size", "data.balance")
NOT_SWEPT_IN_TRAIN = ("train.amp", "train.device")
ROW_KEYS = ("data.image_size", "data.resize", "data.normalize", "data.augment", "train.amp")
MAX_TRIALS = 1000


@dataclass
class Axis:
    """One swept key: a list of values (``--grid``), or a range to draw from (``--range``)."""

    key: str
    values: list[str] | None = None
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    integer: bool = False

    def draw(self, rng: random.Random) -> str:
        if self.values is not None:
            return rng.choice(self.values)
        if self.log:
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            value = rng.uniform(self.low, self.high)
        return str(round(value)) if self.integer else f"{value:.3g}"

    @property
    def listed(self) -> list[str]:
        """A ``--grid`` axis's values (a ``--range`` axis has none: it is drawn from)."""
        assert self.values is not None, f"{self.key} is a --range axis"
        return self.values


def check_key(key: str, option: str) -> None:
    """Refuse, in one line, a key that does not exist or cannot be swept on cached rows."""
    keys = all_keys()
    if key not in keys:
        close = difflib.get_close_matches(key, keys, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{option} {key}: unknown config key{hint}")
    if (key.startswith("train.") and key not in NOT_SWEPT_IN_TRAIN) or key in SWEEPABLE_OUTSIDE_TRAIN:
        return
    if key.startswith("model.") or key in ROW_KEYS:
        why = (
            "it changes the cached rows (the frozen prefix's input, weights or output), so every trial would "
            "extract again"
        )
    else:
        why = "it is not a setting of how the head trains (every trial must share the data, rows and device)"
    raise ConfigError(
        f"{option} {key}: cannot be swept: {why}; a sweep varies train.* keys, data.batch_size and "
        f"data.balance (run vggft train once per {key} value instead)"
    )


def parse_grid(text: str) -> Axis:
    """``KEY=V1,V2,...``"""
    key, sep, values = text.partition("=")
    key = key.strip()
    items = [v.strip() for v in values.split(",")]
    if not sep or not key or not all(items):
        raise ConfigError(f"--grid {text!r}: expected KEY=V1,V2,..., e.g. --grid train.lr=1e-4,1e-3,1e-2")
    check_key(key, "--grid")
    return Axis(key, values=list(dict.fromkeys(items)))


def parse_range(text: str) -> Axis:
    """``KEY=LO:HI`` (uniform) or ``KEY=LO:HI:log`` (log-uniform); whole numbers for an integer key."""
    key, sep, spec = text.partition("=")
    key = key.strip()
    parts = spec.split(":")
    example = "e.g. --range train.lr=1e-5:1e-1:log"
    if not sep or not key or len(parts) not in (2, 3) or (len(parts) == 3 and parts[2].strip() != "log"):
        raise ConfigError(f"--range {text!r}: expected KEY=LO:HI or KEY=LO:HI:log, {example}")
    check_key(key, "--range")
    kind = _number_kind(key)
    if kind is None:
        raise ConfigError(f"--range {key}: not a number; list its values instead: --grid {key}=A,B")
    try:
        low, high = float(parts[0]), float(parts[1])
    except ValueError:
        raise ConfigError(f"--range {text!r}: LO and HI must be numbers, {example}") from None
    log = len(parts) == 3
    if not (math.isfinite(low) and math.isfinite(high) and low < high) or (log and low <= 0):
        need = "0 < LO < HI for a log range" if log else "LO < HI"
        raise ConfigError(f"--range {text!r}: needs {need}, {example}")
    return Axis(key, low=low, high=high, log=log, integer=kind is int)


def _number_kind(key: str) -> type | None:
    """int or float when the key holds a number (possibly null), else None."""
    hint: typing.Any = Config
    for part in key.split("."):
        hint = typing.get_type_hints(hint)[part]
    options = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
    return next((kind for kind in (int, float) if kind in options), None)


def plan_trials(grid: list[Axis], ranges: list[Axis], trials: int | None, seed: int) -> list[dict[str, str]]:
    """Every grid combination in order (no --trials), or ``trials`` seeded random draws over all axes."""
    axes = grid + ranges
    if not axes:
        raise ConfigError(
            "sweep: nothing to sweep; give --grid KEY=V1,V2,... and/or --range KEY=LO:HI[:log] with --trials N"
        )
    keys = [axis.key for axis in axes]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ConfigError(f"sweep: {repeated[0]} is given twice; one --grid or --range per key")
    if trials is not None and not 1 <= trials <= MAX_TRIALS:
        raise ConfigError(f"--trials: expected 1 to {MAX_TRIALS}, got {trials}")
    if trials is None:
        if ranges:
            raise ConfigError(f"--range {ranges[0].key}: random search needs --trials N (how many draws)")
        combos = math.prod(len(axis.listed) for axis in grid)
        if combos > MAX_TRIALS:
            raise ConfigError(
                f"--grid: {combos} combinations is more than {MAX_TRIALS}; use fewer values, or "
                "draw some with --trials N"
            )
        return [dict(zip(keys, values, strict=False)) for values in itertools.product(*(axis.listed for axis in grid))]
    rng = random.Random(seed)
    return [{axis.key: axis.draw(rng) for axis in axes} for _ in range(trials)]


def trial_configs(cfg: Config, plans: list[dict[str, str]]) -> list[Config]:
    """Each trial's full config (``cfg`` with its values), all checked before any work starts."""
    base = cfg.to_dict()
    configs = []
    for number, plan in enumerate(plans, start=1):
        try:
            configs.append(load_config(None, [f"{k}={v}" for k, v in plan.items()], base=base))
        except ConfigError as err:
            values = ", ".join(f"{k}={v}" for k, v in plan.items())
            raise ConfigError(f"sweep trial {number} ({values}): {str(err).removeprefix('--set: ')}") from None
    return configs


def dotted(cfg: Config, key: str):
    """The value of a dotted key in ``cfg``."""
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value
