"""``vggft kfold``: stratified, seeded k-fold cross-validation over train+val on the cached rows, and
``out_of_fold``, the class probabilities of every image from the head that did not train on it (what
label-noise detection needs).

Each fold's head trains for ``train.epochs`` on the other folds with no validation: picking its best
epoch on the held-out fold would let that fold's labels choose the model that scores it.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from vggft.config.options import check_folds
from vggft.config.schema import Config, TrainConfig
from vggft.data import Sample
from vggft.data.loaders import make_loader
from vggft.features.rows import RowDataset
from vggft.reporting.metrics import Metrics
from vggft.reporting.runs import save_results
from vggft.training.loop import HeadFit, HeadOptions, evaluate, fit_head
from vggft.training.train import check_run_folder, make_run_folder
from vggft.tuning.prepare import PreparedData, extract, prepare
from vggft.utils.errors import DataError
from vggft.utils.files import save_csv
from vggft.utils.logs import log, progress


def stratified_folds(labels: Sequence[int], folds: int, seed: int = 0) -> list[list[int]]:
    """``folds`` lists of indices: each class shuffled (seeded) and dealt round the folds in turn, the deal
    carrying on from class to class, so fold sizes differ by at most one and classes are spread evenly."""
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(index)
    result: list[list[int]] = [[] for _ in range(folds)]
    position = 0
    for label, members in sorted(by_class.items()):
        random.Random(f"{seed}/{label}").shuffle(members)
        for index in members:
            result[position % folds].append(index)
            position += 1
    return [sorted(fold) for fold in result]


def take(rows, index: torch.Tensor):
    """The rows at ``index`` (a view where the rows container can give one, else a gathered copy)."""
    return rows.take(index) if hasattr(rows, "take") and not isinstance(rows, torch.Tensor) else rows[index]


@torch.no_grad()
def predict_probs(
    module: nn.Module, rows, labels: torch.Tensor, *, names: list[str], device: torch.device, batch_size: int = 256
):
    """(probabilities [n, outputs], metrics) of a trained head on rows."""
    loader = make_loader(RowDataset(rows, labels), batch_size, device=device)
    metrics = evaluate(module, loader, device, names=names, keep=True, desc="Scoring")
    probs = torch.cat(metrics.probabilities) if metrics.probabilities else torch.empty(0, len(names))
    return probs, metrics


def out_of_fold(
    suffix: nn.Sequential,
    rows,
    labels: torch.Tensor,
    folds: list[list[int]],
    cfg: TrainConfig,
    options: HeadOptions,
) -> tuple[torch.Tensor, list[dict]]:
    """Out-of-fold class probabilities of every row ([n, len(names)], rows in input order) and each fold's
    figures; a fresh copy of ``suffix`` trains on all folds but one and scores that one."""
    names = options.names
    probs = torch.full((len(labels), len(names)), float("nan"))
    figures = []
    for number, held in enumerate(progress(folds, desc="Folds", unit="fold"), start=1):
        held_index = torch.tensor(held, dtype=torch.int64)
        train_index = _all_but(held_index, len(labels))
        fit = fit_head(suffix, (take(rows, train_index), labels[train_index]), None, cfg, options)
        fold_probs, metrics = predict_probs(
            fit.module,
            take(rows, held_index),
            labels[held_index],
            names=names,
            device=options.device,
            batch_size=options.eval_batch_size,
        )
        probs[held_index] = fold_probs
        figures.append(_fold_figures(number, metrics, fit))  # printed once, by the caller, with the others
    return probs, figures


def _all_but(held_index: torch.Tensor, count: int) -> torch.Tensor:
    """The indices 0..count-1 not in ``held_index``, in order: the rows a fold's head trains on."""
    mask = torch.ones(count, dtype=torch.bool)
    mask[held_index] = False
    return torch.arange(count)[mask]


def _fold_figures(number: int, metrics: Metrics, fit: HeadFit) -> dict:
    """One fold's row of folds.csv: its held-out images, how many its head got right, and its training time."""
    return {
        "fold": number,
        "images": metrics.total,
        "correct": metrics.correct,
        "accuracy": metrics.accuracy,
        "seconds": fit.seconds,
    }


def check_fold_sizes(folds: int, samples: Sequence[Sample], class_names: list[str]) -> None:
    if folds > len(samples):
        raise DataError(f"--folds {folds}: only {len(samples)} images in train+val; use at most {len(samples)} folds")
    counts = {name: 0 for name in class_names}
    for _, label in samples:
        counts[class_names[label]] += 1
    small = {name: n for name, n in counts.items() if n < folds}
    if small:
        name = min(small, key=small.__getitem__)
        log.warning(
            f"--folds {folds}: class {name} has only {small[name]} image(s) in train+val, so some folds "
            "hold none of it out"
        )


@dataclass
class FoldRun:
    """Out-of-fold results over train+val, as kfold and label-issues use them."""

    data: PreparedData
    samples: list[Sample]
    labels: torch.Tensor
    probs: torch.Tensor
    figures: list[dict]
    fold_of: list[int] = field(default_factory=list)  # each sample's fold number

    @property
    def accuracies(self) -> list[float]:
        return [f["accuracy"] for f in self.figures]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def std(self) -> float:
        """Sample standard deviation over the folds."""
        return statistics.stdev(self.accuracies) if len(self.accuracies) > 1 else 0.0


def run_folds(cfg: Config, folds: int, seed: int, command: str) -> FoldRun:
    """Extract train+val once, then out-of-fold probabilities of every image."""
    check_folds(folds)  # before the extraction
    data = prepare(cfg, command)
    samples = data.splits["train"] + data.splits["val"]
    check_fold_sizes(folds, samples, data.splits.class_names)
    rows, labels = extract(data, {"train+val": samples})["train+val"]
    split = stratified_folds(labels.tolist(), folds, seed)
    probs, figures = out_of_fold(data.suffix, rows, labels, split, cfg.train, data.fit_options())
    fold_of = [0] * len(samples)
    for number, members in enumerate(split, start=1):
        for index in members:
            fold_of[index] = number
    return FoldRun(data, samples, labels, probs, figures, fold_of)


def write_oof(run: FoldRun, path: Path) -> Path:
    """path, label, fold, then one probability column per model output."""
    names = run.data.names
    rows = (
        [p, names[label], fold, *(f"{v:.6f}" for v in probs.tolist())]
        for (p, label), fold, probs in zip(run.samples, run.fold_of, run.probs, strict=False)
    )
    return save_csv(path, ["path", "label", "fold", *names], rows)


def kfold(cfg: Config, folds: int, seed: int = 0) -> tuple[FoldRun, Path, list[Path]]:
    """``vggft kfold``: per-fold accuracy and out-of-fold probabilities, written to a run folder."""
    started = time.monotonic()
    check_run_folder(cfg, "kfold")
    run = run_folds(cfg, folds, seed, "kfold")
    folder = make_run_folder(cfg, "kfold")
    fold_csv = save_csv(
        folder / "folds.csv",
        ["fold", "images", "correct", "accuracy", "seconds"],
        ([f["fold"], f["images"], f["correct"], f"{f['accuracy']:.6f}", f"{f['seconds']:.2f}"] for f in run.figures),
    )
    files = [write_oof(run, folder / "oof.csv"), fold_csv, folder / "config.yaml"]
    figures = {"folds": folds, "images": len(run.samples), "cv_acc": run.mean, "cv_std": run.std}
    save_results(folder, "kfold", time.monotonic() - started, cfg, **figures)
    return run, folder, files
