"""Predicting classes for image files and folders with saved weights.

Preprocessing is the one the weights were trained with (the sidecar's config: a
model trained at 160 px is served at 160 px). An image that cannot be decoded
gets a row with an ``error`` instead of stopping the run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from .datasets import _images_in
from .device import (autocast_dtype, autocast_factory, out_of_memory_hint, prepare_backend, resolve_device,
                     resolve_workers)
from .errors import ConfigError, DataError
from .evaluate import load_trained_model
from .images import DECODE_ERRORS, IMG_EXTENSIONS, decode_failure, open_rgb
from .loaders import make_loader
from .transforms import eval_transform



def collect_images(inputs: Sequence[Path]) -> list[str]:
    """The files named, and every image below the folders named (hidden ones skipped), sorted, once each."""
    if not inputs:
        raise DataError("IMAGE_OR_DIR: no input given; name image files or folders of images")
    found: dict[str, str] = {}
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            paths = _images_in(item)
        elif item.is_file():
            paths = [str(item)]
        else:
            raise DataError(f"IMAGE_OR_DIR: '{item}' not found; name existing image files or folders")
        for path in paths:
            found.setdefault(os.path.realpath(path), path)
    if not found:
        named = ", ".join(f"'{item}'" for item in inputs)
        raise DataError(f"IMAGE_OR_DIR: no image files ({', '.join(IMG_EXTENSIONS)}) in {named}")
    return sorted(found.values())


class _Images(Dataset):
    """(tensor, error message): a zero tensor and the reason for a file that cannot be decoded."""

    def __init__(self, paths: list[str], transform, size: int):
        self.paths, self.transform, self.size = paths, transform, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return self.transform(open_rgb(self.paths[index])), ""
        except DECODE_ERRORS as err:
            reason, detail = decode_failure(err)
            lines = detail.strip().splitlines()
            return torch.zeros(3, self.size, self.size), f"{reason} ({lines[0]})" if lines else reason


def predict(
    weights: Path,
    inputs: Sequence[Path],
    config: Path | None = None,
    overrides: Sequence[str] = (),
    topk: int = 5,
    batch_size: int = 32,
    *,
    progress: bool = False,
) -> list[dict]:
    """One row per image, sorted by path: {"path", "top": [{"class", "probability"}, ...]},
    or {"path", "top": [], "error"} for a file that cannot be decoded."""
    if topk < 1:
        raise ConfigError(f"--topk: expected 1 or more, got {topk}")
    if batch_size < 1:
        raise ConfigError(f"batch size: expected 1 or more, got {batch_size}")
    paths = collect_images(inputs)
    trained = load_trained_model(weights, config, list(overrides))
    cfg = trained.cfg
    names = trained.names
    k = min(topk, trained.num_classes)

    device = resolve_device(cfg.train.device)
    prepare_backend(device)
    autocast = autocast_factory(device, autocast_dtype(device, cfg.train.amp))  # as vggft eval scores
    model = trained.model.to(device)
    workers = resolve_workers(cfg.data, device)
    workers = min(workers, max(0, (len(paths) - 1) // batch_size))  # no pool of workers for one batch
    dataset = _Images(paths, eval_transform(cfg.data), cfg.data.image_size)
    loader = make_loader(dataset, batch_size, device=device, num_workers=workers)

    rows: list[dict] = []
    with torch.inference_mode(), out_of_memory_hint(device, {"--batch-size": batch_size}):
        for images, errors in tqdm(loader, desc="Predicting", unit="batch", disable=not progress, leave=False):
            with autocast():
                logits = model(images.to(device, non_blocking=True))
            probs, indices = torch.softmax(logits.float(), dim=1).topk(k, dim=1)
            for p_row, i_row, error in zip(probs.tolist(), indices.tolist(), errors):
                path = paths[len(rows)]
                if error:
                    rows.append({"path": path, "top": [], "error": error})
                else:
                    rows.append({"path": path, "top": [{"class": names[i], "probability": p}
                                                       for p, i in zip(p_row, i_row)]})
    return rows
