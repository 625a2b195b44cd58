"""``vggft eval``: scoring saved weights on a split, every image once, with exact counts and per-class figures.

Takes vggft's own weights (with their JSON sidecar), a run's best.pt/last.pt, and plain state_dicts
saved by the tutorial's script (class count read from the weights, class names from the data).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import Config
from .data import DataSplits, find_splits
from .data.images import drop_bad_images, open_rgb
from .data.loaders import make_loader
from .data.transforms import eval_transform, normalization
from .device import autocast_dtype, out_of_memory_hint, prepare_backend, resolve_device
from .engine import evaluate
from .errors import DataError, OutputError, WeightsError
from .features import FeatureSource
from .files import cache_root
from .inference import TrainedModel, load_model
from .logs import log
from .metrics import Metrics
from .reports import save_confusion, save_image_grid


def align_labels(trained: TrainedModel, splits: DataSplits) -> DataSplits:
    """Relabel the data to the order the weights were trained with; refuse a class-count mismatch."""
    data_names = splits.class_names
    if trained.class_names is None:
        if trained.num_classes != len(data_names):
            raise WeightsError(
                f"--weights: '{trained.path}' has a {trained.num_classes}-class head but {splits.root} has "
                f"{len(data_names)} classes ({', '.join(data_names)}); evaluate on the data it was trained on "
                "(--set data.root=PATH)"
            )
        trained.class_names = list(data_names)
        return splits
    unknown = [name for name in data_names if name not in trained.class_names]
    if unknown:
        raise DataError(
            f"{splits.root}: class(es) {', '.join(unknown)} unknown to '{trained.path}' "
            f"(trained on {', '.join(trained.class_names)}); evaluate on data with those classes"
        )
    index = [trained.class_names.index(name) for name in data_names]
    relabelled = {split: [(path, index[label]) for path, label in samples]
                  for split, samples in splits.splits.items()}
    return DataSplits(splits.root, splits.layout, list(trained.class_names), relabelled)


def one_split(cfg: Config, record: dict | None, source: str, split: str) -> DataSplits:
    """The ``split`` alone, its images decoded (verdicts cached) and the unreadable ones skipped or an error:
    the other splits' files are not read, and not counted in the "Skipping N unreadable image(s)" note."""
    found = find_splits(cfg.data, record, source)
    if not found[split]:
        raise DataError(f"{found.root}: the {split} split has no images; choose another with --split")
    only = DataSplits(found.root, found.layout, found.class_names, {split: found[split]})
    splits, _ = drop_bad_images(only, cfg.data, cache_root(cfg.cache.dir) if cfg.cache.enabled else None)
    return splits


def evaluate_weights(
    weights: Path,
    config: Path | None = None,
    overrides: list[str] = (),
    *,
    split: str = "test",
    topk: int = 5,
    misclassified: int = 0,
    plots_dir: Path | None = None,
) -> tuple[Metrics, TrainedModel, list[Path]]:
    """acc@1 (and per-class figures) of saved weights on every image of ``split``."""
    trained = load_model(weights, config, overrides)
    cfg = trained.cfg
    device = resolve_device(cfg.train.device)
    prepare_backend(device)
    record = trained.sidecar.get("split") if trained.sidecar else None
    splits = align_labels(trained, one_split(cfg, record, str(weights), split))
    samples = splits[split]
    precision = autocast_dtype(device, cfg.train.amp)
    source = FeatureSource(trained.model, cfg, device, precision)
    with out_of_memory_hint(device, {"data.eval_batch_size": cfg.data.eval_batch_size}):
        loader = make_loader(source.dataset(samples, desc=split), cfg.data.eval_batch_size, device=device,
                             num_workers=source.loader_workers)
        metrics = evaluate(source.module, loader, device, precision, names=trained.names,
                           ks=sorted({1, topk}), keep=misclassified > 0, desc=f"Evaluating {split}")
    folder = Path(plots_dir) if plots_dir else Path(weights).parent
    stem = Path(weights).stem
    written = []
    title = f"{Path(weights).name} on the {split} split: {metrics.summary_line()}"
    try:  # the scores are the result; a plot that cannot be written is a note, not a failure
        for suffix, normalize in (("", False), ("_normalized", True)):
            written.append(save_confusion(metrics.confusion, metrics.class_names,
                                          folder / f"{stem}.confusion_{split}{suffix}.png", title, normalize))
    except OutputError as err:
        log.warning(f"Confusion matrix PNG not written ({err}); choose a folder with --plots DIR")
    mistakes = metrics.worst_mistakes(misclassified)
    if mistakes:
        images = torch.stack([eval_transform(cfg.data)(open_rgb(samples[i][0])) for i, *_ in mistakes])
        names = metrics.class_names
        titles = [f"true {names[t]}\npred {names[p]} ({c:.2f})\n{os.path.relpath(samples[i][0], splits.root)}"
                  for i, t, p, c in mistakes]
        mean, std = normalization(cfg.data)
        written.append(save_image_grid(images, titles, mean, std, folder / f"{stem}.misclassified_{split}.png",
                                       title_colors=["red"] * len(mistakes)))
    elif misclassified > 0:
        log.info(f"--misclassified: no mistakes on the {split} split, so no grid was written")
    return metrics, trained, written
