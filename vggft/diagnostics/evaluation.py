"""``vggft eval``: scoring saved weights on a split, every image once, with exact counts and per-class figures.

Takes vggft's own weights (with their JSON sidecar), a run's best.pt/last.pt, and plain state_dicts
saved by the tutorial's script (class count read from the weights, class names from the data).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from vggft.config.options import check_eval
from vggft.config.schema import Config
from vggft.data import DataSplits, find_splits
from vggft.data.images import drop_bad_images, open_rgb
from vggft.data.loaders import make_loader
from vggft.data.transforms import eval_transform, normalization
from vggft.features.cache import FeatureSource
from vggft.model.conformal import check_coverage, level_key, prediction_sets, set_coverage
from vggft.model.inference import TrainedModel, load_model
from vggft.reporting.metrics import Metrics
from vggft.reporting.plots import save_confusion, save_image_grid, save_reliability
from vggft.training.calibration import calibration_summary
from vggft.training.loop import evaluate
from vggft.utils.device import (
    autocast_dtype,
    environment_line,
    out_of_memory_hint,
    prepare_backend,
    resolve_device,
)
from vggft.utils.errors import DataError, OutputError, WeightsError
from vggft.utils.files import cache_root, save_csv
from vggft.utils.logs import log


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
    relabelled = {split: [(path, index[label]) for path, label in samples] for split, samples in splits.splits.items()}
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
    overrides: Sequence[str] = (),
    *,
    split: str = "test",
    topk: int = 5,
    misclassified: int = 0,
    plots_dir: Path | None = None,
    top_losses: int = 0,
    explain: bool = False,
    coverage: float | None = None,
) -> tuple[Metrics, TrainedModel, list[Path]]:
    """acc@1 (and per-class figures, confused pairs, calibration) of saved weights on every image of ``split``.

    ``misclassified``/``top_losses``: grids of the N most confident mistakes / N highest-loss images (the
    latter with a CSV); ``explain`` draws Grad-CAM heatmaps of the predicted class on those grids; ``coverage``:
    the conformal sets' empirical coverage and mean size (``extra["coverage"]``).
    """
    check_eval(topk, misclassified, top_losses, explain)
    check_coverage(coverage)
    trained = load_model(weights, config, overrides)
    device = resolve_device(trained.cfg.train.device)
    prepare_backend(device)
    record = trained.sidecar.get("split") if trained.sidecar else None
    splits = align_labels(trained, one_split(trained.cfg, record, str(weights), split))
    log.info(environment_line("eval", device, autocast_dtype(device, trained.cfg.train.amp)))
    metrics = _score(trained, splits[split], split, device, topk)
    if coverage is not None:
        metrics.extra["coverage"] = coverage_summary(trained, metrics, coverage)
    out = _Plots(Path(plots_dir) if plots_dir else Path(weights).parent, Path(weights).stem, split)
    _write_plots(
        out,
        metrics,
        trained,
        splits,
        split,
        misclassified=misclassified,
        top_losses=top_losses,
        explain=explain,
        device=device,
    )
    return metrics, trained, out.written


def cached_loader(
    trained: TrainedModel, samples: list, split: str, device: torch.device
) -> tuple[FeatureSource, torch.dtype | None, DataLoader]:
    """(feature source, the precision its module computes in, loader) that score ``samples`` with ``trained``:
    cached rows where the cache has them, the frozen prefix run (and its rows kept) where it does not."""
    cfg = trained.cfg
    source = FeatureSource(trained.model, cfg, device, autocast_dtype(device, cfg.train.amp))
    loader = make_loader(
        source.dataset(samples, desc=split), cfg.data.eval_batch_size, device=device, num_workers=source.loader_workers
    )
    return source, source.module_precision, loader


def _score(trained: TrainedModel, samples: list, split: str, device: torch.device, topk: int) -> Metrics:
    """Every image of ``samples`` scored once, its logits kept, and the calibration before and after the
    temperature."""
    with out_of_memory_hint(device, {"data.eval_batch_size": trained.cfg.data.eval_batch_size}):
        source, precision, loader = cached_loader(trained, samples, split, device)
        metrics = evaluate(
            source.module,
            loader,
            device,
            precision,
            names=trained.names,
            ks=sorted({1, topk}),
            keep=True,
            desc=f"Evaluating {split}",
        )
    metrics.extra["calibration"] = calibration_summary(
        torch.cat(metrics.logits), torch.cat(metrics.labels), trained.temperature
    )
    return metrics


def coverage_summary(trained: TrainedModel, metrics: Metrics, coverage: float) -> dict:
    """Empirical coverage and mean size of the conformal sets at ``coverage`` on the scored split, overall and
    per class (the guarantee is marginal: over images, not per class); {"missing": why} without a calibration."""
    conformal = (trained.sidecar or {}).get("conformal")
    if not conformal:
        return {
            "target": coverage,
            "missing": f"no conformal calibration in the sidecar; vggft calibrate -w {trained.path}",
        }
    threshold = conformal["thresholds"].get(level_key(coverage))
    probs = trained.probabilities(torch.cat(metrics.logits))
    sets = prediction_sets(probs, threshold, conformal["method"])
    report = set_coverage(sets, torch.cat(metrics.labels), trained.names)
    return {"target": coverage, "method": conformal["method"], "threshold": threshold, **report}


def _write_plots(
    out: _Plots,
    metrics: Metrics,
    trained: TrainedModel,
    splits: DataSplits,
    split: str,
    *,
    misclassified: int,
    top_losses: int,
    explain: bool,
    device: torch.device,
) -> None:
    """The files beside the scores: confusion matrices, reliability diagram, the mistakes and top-losses grids."""
    title = f"{trained.path.name} on the {split} split: {metrics.summary_line()}"
    out.write(
        "Confusion matrix PNG",
        save_confusion,
        metrics.confusion,
        metrics.class_names,
        out.path("confusion", "png"),
        title,
        False,
    )
    out.write(
        "Row-normalised confusion matrix PNG",
        save_confusion,
        metrics.confusion,
        metrics.class_names,
        out.path("confusion", "png", "_normalized"),
        title,
        True,
    )
    out.write("Reliability diagram PNG", save_reliability, metrics.extra["calibration"], out.path("reliability", "png"))
    _mistakes(out, metrics, trained, splits, split, misclassified, explain, device)
    if top_losses:
        _top_losses(metrics, trained, splits, split, top_losses, explain, out, device)


def _mistakes(
    out: _Plots,
    metrics: Metrics,
    trained: TrainedModel,
    splits: DataSplits,
    split: str,
    count: int,
    explain: bool,
    device: torch.device,
) -> None:
    """The grid of the ``count`` most confident mistakes, each titled with its classes and file."""
    mistakes = metrics.worst_mistakes(count)
    if not mistakes:
        if count > 0:
            log.info(f"--misclassified: no mistakes on the {split} split, so no grid was written")
        return
    samples, names = splits[split], metrics.class_names
    titles = [
        f"true {names[t]}\npred {names[p]} ({c:.2f})\n{_shown_path(samples[i][0], splits)}" for i, t, p, c in mistakes
    ]
    out.write(
        "Mistakes grid",
        _grid,
        trained,
        samples,
        mistakes,
        titles,
        ["red"] * len(mistakes),
        explain,
        out.path("misclassified", "png"),
        device,
    )


class _Plots:
    """Where eval's files go (``<folder>/<stem>.<kind>_<split>.<ext>``) and which were written."""

    def __init__(self, folder: Path, stem: str, split: str):
        self.folder, self.stem, self.split = folder, stem, split
        self.written: list[Path] = []

    def path(self, kind: str, ext: str, suffix: str = "") -> Path:
        return self.folder / f"{self.stem}.{kind}_{self.split}{suffix}.{ext}"

    def write(self, what: str, save, *args) -> None:
        try:  # the scores are the result; a file that cannot be written is a note, not a failure
            self.written.append(save(*args))
        except OutputError as err:
            log.warning(f"{what} not written ({err}); choose a folder with --plots DIR")


def _grid(
    trained: TrainedModel,
    samples,
    picked: list[tuple],
    titles: list[str],
    colors: list[str],
    explain: bool,
    path: Path,
    device: torch.device,
) -> Path:
    """The picked samples (index, true, predicted, ...) as a titled grid, with Grad-CAM of the prediction if asked."""
    cfg = trained.cfg
    images = torch.stack([eval_transform(cfg.data)(open_rgb(samples[i][0])) for i, *_ in picked])
    heatmaps = None
    if explain:
        from vggft.diagnostics.explain import grad_cam

        heatmaps = grad_cam(trained.model.to(device), images.to(device), [p for _, _, p, *_ in picked]).maps
    mean, std = normalization(cfg.data)
    return save_image_grid(images, titles, mean, std, path, title_colors=colors, heatmaps=heatmaps)


def _shown_path(path: str, splits: DataSplits) -> str:
    """An image's path as a grid tile shows it: relative to the data root."""
    return os.path.relpath(path, splits.root)


def _top_losses(
    metrics: Metrics,
    trained: TrainedModel,
    splits: DataSplits,
    split: str,
    count: int,
    explain: bool,
    out: _Plots,
    device: torch.device,
) -> None:
    """The ``count`` highest-loss images: a CSV (path, true, predicted, probability, loss) and a grid, each tile
    titled with its classes, loss and file (as the mistakes grid's are)."""
    samples = splits[split]
    worst = metrics.top_losses(count)
    names = metrics.class_names
    rows = [
        {"path": samples[i][0], "true": names[t], "predicted": names[p], "probability": c, "loss": loss}
        for i, t, p, c, loss in worst
    ]
    metrics.extra["top_losses"] = rows
    out.write("Top-losses CSV", _write_csv, rows, out.path("top_losses", "csv"))
    titles = [
        f"true {names[t]}\npred {names[p]} {c:.2f}\nloss {loss:.2f}\n{_shown_path(samples[i][0], splits)}"
        for i, t, p, c, loss in worst
    ]
    colors = ["green" if r["true"] == r["predicted"] else "red" for r in rows]
    out.write(
        "Top-losses grid",
        _grid,
        trained,
        samples,
        worst,
        titles,
        colors,
        explain,
        out.path("top_losses", "png"),
        device,
    )


def _write_csv(rows: list[dict], path: Path) -> Path:
    return save_csv(
        path,
        ["path", "true", "predicted", "probability", "loss"],
        ([r["path"], r["true"], r["predicted"], f"{r['probability']:.6f}", f"{r['loss']:.6f}"] for r in rows),
    )
