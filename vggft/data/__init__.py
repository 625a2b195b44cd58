"""The data: folders and splits, image decoding and verdicts, transforms, loaders.

``prepare_data`` goes from ``data.*`` settings to checked splits: discovery, then one decode of
every image (its verdict cached), the unreadable ones left out or an error per ``data.bad_images``.
"""

from __future__ import annotations

from vggft.config.schema import Config
from vggft.data.folders import SPLITS, DataSplits, Sample, check_learnable, find_splits, split_record
from vggft.data.images import BadImages, drop_bad_images
from vggft.utils.files import cache_root

__all__ = ["SPLITS", "BadImages", "DataSplits", "Sample", "find_splits", "prepare_data", "split_record"]


def prepare_data(
    cfg: Config, record: dict | None = None, source: str = "", *, to_train: bool = False
) -> tuple[DataSplits, BadImages]:
    """The usable splits (a pool's from ``record`` when given): bad images skipped (and reported once) or an
    error, per ``data.bad_images``. ``to_train``: refuse, before any decoding, classes that cannot be learned."""
    splits = find_splits(cfg.data, record, source)
    if to_train and splits["train"]:
        check_learnable(splits)
    cache_dir = cache_root(cfg.cache.dir) if cfg.cache.enabled else None
    return drop_bad_images(splits, cfg.data, cache_dir)
