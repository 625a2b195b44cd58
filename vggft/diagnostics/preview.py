"""Looking at the model and the data without training: the torchinfo summary and a batch grid."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torchinfo

from vggft.config.options import check_show_batch, check_summary
from vggft.config.schema import Config
from vggft.data import find_splits, prepare_data
from vggft.data.loaders import image_loader
from vggft.data.transforms import eval_transform, normalization, train_transform
from vggft.model import build as networks
from vggft.model.build import freeze, replace_head
from vggft.reporting.plots import save_image_grid
from vggft.training.train import check_run_folder, make_run_folder
from vggft.utils.errors import DataError
from vggft.utils.logs import log


def summary(cfg: Config, num_classes: int | None = None) -> torchinfo.ModelStatistics:
    """The torchinfo table of the model as configured: architecture only, no data, no weights file."""
    check_summary(num_classes)
    classes, why = summary_classes(cfg, num_classes)
    log.info(f"Summary: a head for {classes} classes ({why})")
    model = networks.vgg(cfg.model.arch, init_weights=False)  # looked up when called: tests swap the factory
    with torch.no_grad():
        for param in model.parameters():  # defined values for the shape-only forward pass
            param.zero_()
    replace_head(model, cfg.model.head, classes)
    freeze(model, cfg.model)
    size = cfg.data.image_size
    return torchinfo.summary(
        model,
        input_size=(1, 3, size, size),
        device="cpu",
        verbose=0,
        depth=2,
        col_names=("output_size", "num_params", "trainable"),
    )


def summary_classes(cfg: Config, num_classes: int | None) -> tuple[int, str]:
    """(classes of the summarised head, where the number came from): --num-classes, model.num_classes, the
    class folders under data.root (listed, not decoded), else 2 with the reason."""
    if num_classes:
        return num_classes, "--num-classes"
    if cfg.model.num_classes:
        return cfg.model.num_classes, "model.num_classes"
    try:
        names = find_splits(cfg.data).class_names
    except DataError as err:
        return 2, f"none found in data.root: {str(err).split(';')[0]}; give --num-classes"
    return len(names), f"the class folders in {cfg.data.root}; --num-classes to change"


UNIT_PREFIX = {"MEGABYTES": "millions", "GIGABYTES": "billions", "TERABYTES": "trillions"}


def summary_text(stats: torchinfo.ModelStatistics) -> str:
    """torchinfo's table as text, its mult-adds in plain units: torchinfo 1.8 on Python 3.11+ writes
    'Total mult-adds (Units.GIGABYTES)' (an enum's name) where it means a count in billions (G)."""
    return re.sub(r"\(Units\.(\w+)\)", lambda m: f"({UNIT_PREFIX.get(m[1], m[1])})", str(stats))


def show_batch(cfg: Config, split: str = "train", out: Path | None = None, count: int | None = None) -> Path:
    """A PNG grid of one batch as the model sees it, de-normalised, each titled with its class: ``out`` (a PNG
    path, or a folder to hold ``batch_<split>.png``), else a new run folder (runs/show_batch, ...)."""
    check_show_batch(count)
    if out is None:
        check_run_folder(cfg, SHOW_BATCH)
    splits, _ = prepare_data(cfg)
    samples = splits[split]
    if not samples:
        raise DataError(f"{splits.root}: the {split} split has no images; choose another with --split")
    generator = torch.Generator().manual_seed(cfg.train.seed)
    transform = train_transform(cfg.data) if split == "train" else eval_transform(cfg.data)
    loader = image_loader(
        samples,
        transform,
        count or cfg.data.batch_size,
        device=torch.device("cpu"),
        num_workers=0,
        shuffle=True,
        generator=generator,
    )
    images, labels = next(iter(loader))
    mean, std = normalization(cfg.data)
    path = batch_path(cfg, split, out)
    return save_image_grid(images, [splits.class_names[i] for i in labels.tolist()], mean, std, path)


SHOW_BATCH = "show_batch"  # the run folder's name when output.name gives none


def batch_path(cfg: Config, split: str, out: Path | None) -> Path:
    """Where show-batch writes: ``out`` when it names a PNG; inside it when it is a folder (one that exists, or a
    name without a suffix); with no ``out``, in a new run folder, made now that the grid is drawn."""
    name = f"batch_{split}.png"
    if out is None:
        return make_run_folder(cfg, SHOW_BATCH) / name
    out = Path(out)
    return out / name if out.is_dir() or not out.suffix else out
