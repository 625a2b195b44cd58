"""Scoring saved weights on a split: every image once, exact counts, per-class figures.

Takes vggft's own weights (with their JSON sidecar) and plain state_dicts saved by
the tutorial's script (class count read from the weights, class names from the data).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint
from .config import Config, load_config
from .datasets import DataSplits
from .device import out_of_memory_hint, prepare_backend, resolve_device
from .errors import DataError, OutputError, WeightsError
from .feeder import Feeder
from .images import open_rgb
from .metrics import Metrics, output_names
from .model import describe_state_dict, freeze, model_from_weights
from .plots import save_confusion, save_image_grid
from .prepare import prepare_data
from .transforms import eval_transform, normalization
from .train import evaluate

Log = Callable[[str], None]


@dataclass
class TrainedModel:
    """Saved weights with what is needed to use them: architecture, head, class names, config."""

    model: torch.nn.Module
    cfg: Config
    class_names: list[str] | None  # None: a bare state_dict; names come from the data
    num_classes: int
    sidecar: dict | None
    path: Path

    @property
    def names(self) -> list[str]:
        """A name per output: the class names (class_0, class_1, ... for a bare state_dict), then unused_K."""
        return output_names(self.class_names or [f"class_{i}" for i in range(self.num_classes)], self.num_classes)


def load_trained_model(weights: Path, config: Path | None = None, overrides: list[str] = ()) -> TrainedModel:
    """Weights plus their sidecar (if any), the sidecar's config under ``--config``/``--set``."""
    weights = Path(weights)
    state_dict, sidecar = checkpoint.load_trained(weights)
    try:
        arch, head, num_classes = describe_state_dict(state_dict)
    except WeightsError as err:
        raise WeightsError(f"--weights: '{weights}' is not VGG weights vggft can use: {err}") from None
    except (KeyError, IndexError):
        raise WeightsError(f"--weights: '{weights}' is not a VGG state_dict") from None
    base = sidecar["config"] if sidecar else {"model": {"arch": arch, "head": head}}
    cfg = load_config(config, overrides, base=base)
    # What the file holds wins over what a config says about it.
    cfg.model = dataclasses.replace(cfg.model, arch=arch, head=head, num_classes=num_classes, unfreeze=0)
    cfg.data = dataclasses.replace(cfg.data, augment="none")
    try:
        model = model_from_weights(state_dict, arch, head, num_classes)
    except RuntimeError as err:
        raise WeightsError(f"--weights: '{weights}' does not load into {arch} ({str(err).splitlines()[0]})") from None
    freeze(model, cfg.model)  # the same frozen prefix as in training, so cached features are shared
    class_names = list(sidecar["class_names"]) if sidecar else None
    return TrainedModel(model, cfg, class_names, num_classes, sidecar, weights)


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


def evaluate_weights(
    weights: Path,
    config: Path | None = None,
    overrides: list[str] = (),
    *,
    split: str = "test",
    topk: int = 5,
    misclassified: int = 0,
    plots_dir: Path | None = None,
    log: Log = print,
    progress: bool = True,
) -> tuple[Metrics, TrainedModel, list[Path]]:
    """acc@1 (and per-class figures) of saved weights on every image of ``split``."""
    trained = load_trained_model(weights, config, overrides)
    cfg = trained.cfg
    device = resolve_device(cfg.train.device)
    prepare_backend(device)
    manifest = None
    if trained.sidecar and trained.sidecar.get("split_manifest"):
        manifest = Path(weights).parent / trained.sidecar["split_manifest"]
    splits, _ = prepare_data(cfg, manifest=manifest, log=log, progress=progress)
    splits = align_labels(trained, splits)
    samples = splits[split]
    if not samples:
        raise DataError(f"{splits.root}: the {split} split has no images; choose another with --split")
    feeder = Feeder(trained.model, cfg, device, log=log, progress=progress)
    with out_of_memory_hint(device, {"data.eval_batch_size": cfg.data.eval_batch_size}):
        loader = feeder.loader(feeder.dataset(samples, desc=split), cfg.data.eval_batch_size)
        metrics = evaluate(feeder.module, loader, feeder, trained.class_names, trained.num_classes,
                           desc=f"Evaluating {split}", progress=progress, ks=sorted({1, topk}),
                           keep=misclassified > 0)
    folder = Path(plots_dir) if plots_dir else Path(weights).parent
    stem = Path(weights).stem
    written = []
    try:  # the scores are the result; a plot that cannot be written is a note, not a failure
        written.append(save_confusion(metrics.confusion, metrics.class_names, folder / f"{stem}.confusion_{split}.png"))
    except OutputError as err:
        log(f"Confusion matrix PNG not written ({err}); choose a folder with --plots DIR")
    mistakes = metrics.worst_mistakes(misclassified)
    if mistakes:
        images = torch.stack([eval_transform(cfg.data)(open_rgb(samples[i][0])) for i, *_ in mistakes])
        names = metrics.class_names
        titles = [f"true {names[t]}\npred {names[p]} {c:.2f}" for _, t, p, c in mistakes]
        mean, std = normalization(cfg.data)
        written.append(save_image_grid(images, titles, mean, std, folder / f"{stem}.misclassified_{split}.png",
                                       title_colors=["red"] * len(mistakes)))
    elif misclassified > 0:
        log(f"--misclassified: no mistakes on the {split} split, so no grid was written")
    return metrics, trained, written
