"""The data: folders and splits, image decoding and verdicts, transforms, loaders.

``prepare_data`` goes from ``data.*`` settings to checked splits: discovery, then one decode of
every image (its verdict cached), the unreadable ones left out or an error per ``data.bad_images``.
"""

from __future__ import annotations

from vggft.config.schema import Config, DataConfig
from vggft.data.folders import SPLITS, DataSplits, Sample, check_learnable, find_splits, split_record
from vggft.data.images import BadImages, drop_bad_images
from vggft.utils.files import cache_root
from vggft.utils.logs import log

__all__ = ["SPLITS", "BadImages", "DataSplits", "Sample", "find_splits", "prepare_data", "split_record"]


def prepare_data(
    cfg: Config, record: dict | None = None, source: str = "", *, to_train: bool = False
) -> tuple[DataSplits, BadImages]:
    """The usable splits (a pool's from ``record`` when given): bad images skipped (and reported once) or an
    error, per ``data.bad_images``. ``to_train``: refuse, before any decoding, classes that cannot be learned."""
    splits = find_splits(cfg.data, record, source)
    if to_train and splits["train"]:
        check_learnable(splits)
    if to_train and (note := crop_note(cfg.data)):
        log.warning(note)
    cache_dir = cache_root(cfg.cache.dir) if cfg.cache.enabled else None
    return drop_bad_images(splits, cfg.data, cache_dir)


def crop_note(data: DataConfig) -> str | None:
    """A note when the centre crop keeps less than half of each side of the resized image: ``image_size: 32``
    under the default ``resize: 256`` trains on the middle 1/64 of every image (sklearn's digits, vgg11_bn from
    scratch at 32 px, 4 epochs: test accuracy 0.445 so cropped against 0.974 squashed, scripts/bench_digits.py)."""
    if data.resize is None or 2 * data.image_size >= data.resize:
        return None
    keep = data.image_size / data.resize
    return (
        f"Note: data.resize {data.resize} with data.image_size {data.image_size}: the centre crop keeps "
        f"{keep:.0%} of each side of every image; set data.resize: {round(data.image_size * 256 / 224)} "
        "(the 256 -> 224 ratio) or null (squash the whole image to image_size)"
    )
