"""From ``data.*`` settings to checked splits: discovery, then one decode of every image (cached)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .config import Config
from .datasets import DataSplits, find_splits
from .files import cache_root
from .scan import BadImages, drop_bad_images


def prepare_data(
    cfg: Config, manifest: Path | None = None, log: Callable[[str], None] = print, progress: bool = True
) -> tuple[DataSplits, BadImages]:
    """The usable splits: bad images skipped (and reported once) or an error, per ``data.bad_images``."""
    splits = find_splits(cfg.data, manifest)
    cache_dir = cache_root(cfg.cache.dir) if cfg.cache.enabled else None
    return drop_bad_images(splits, cfg.data, cache_dir, log=log, progress=progress)
