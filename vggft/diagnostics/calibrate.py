"""``vggft calibrate``: fit, after training, what ``vggft train`` fits on its val split (the temperature, the
conformal thresholds, the novelty statistics), for weights trained without one; stored in their sidecar,
sealed again. The statistics come from the train split's penultimate rows, the thresholds from the split named
(never test: its figures would no longer be an unseen measure)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from vggft.diagnostics.evaluation import align_labels, cached_loader, one_split
from vggft.model.inference import TrainedModel, load_model
from vggft.model.novelty import GaussianFit, penultimate_rows
from vggft.model.weights import store_trust
from vggft.training.calibration import fit_temperature, fit_trust
from vggft.training.loop import evaluate, gather_penultimate
from vggft.utils.device import out_of_memory_hint, prepare_backend, resolve_device
from vggft.utils.errors import ConfigError, WeightsError
from vggft.utils.logs import log


def calibrate_weights(weights: Path, config: Path | None, overrides: Sequence[str] = (), split: str = "val") -> dict:
    """Fit and store; returns what was stored: {"sidecar", "temperature", "conformal", "novelty", "images"}."""
    if split == "test":
        raise ConfigError("--split test: calibrating on the test split would spoil it as a measure; use val")
    trained = load_model(weights, config, overrides)
    if not trained.sidecar or "format" not in trained.sidecar:
        raise WeightsError(
            f"--weights: '{weights}' has no vggft sidecar to store a calibration in; pass the weights that vggft "
            "train saved (output.weights)"
        )
    if split == "train":
        log.warning("--split train: the model has seen these images, so the sets will cover less than they say")
    record = trained.sidecar.get("split")
    calib = align_labels(trained, one_split(trained.cfg, record, str(weights), split))
    train = align_labels(trained, one_split(trained.cfg, record, str(weights), "train"))
    logits, labels, rows = _outputs(trained, calib[split], split)
    gathered = _gathered(trained, train["train"])
    fit = fit_temperature(logits, labels)
    temperature = None if fit.at_bound else fit.temperature
    trust = fit_trust((logits, labels, rows), gathered, temperature)
    sidecar = store_trust(Path(weights), temperature, trust)
    return {
        "sidecar": str(sidecar),
        "split": split,
        "images": len(labels),
        "train_images": gathered.count,
        "temperature": temperature,
        "conformal": trust.conformal,
        "novelty": trust.novelty,
    }


def _outputs(trained: TrainedModel, samples: list, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, labels, penultimate rows) of every image of ``samples`` (cached rows where the cache has them)."""
    device = _device(trained)
    with out_of_memory_hint(device, {"data.eval_batch_size": trained.cfg.data.eval_batch_size}):
        source, precision, loader = cached_loader(trained, samples, split, device)
        with penultimate_rows(trained.model) as rows:
            kept = evaluate(source.module, loader, device, precision, names=trained.names, keep=True, desc=split)
    return torch.cat(kept.logits), torch.cat(kept.labels), torch.cat(rows)


def _gathered(trained: TrainedModel, samples: list) -> GaussianFit:
    """The novelty statistics' sums over the train images' penultimate rows, a batch at a time."""
    device = _device(trained)
    with out_of_memory_hint(device, {"data.eval_batch_size": trained.cfg.data.eval_batch_size}):
        source, precision, loader = cached_loader(trained, samples, "train", device)
        return gather_penultimate(source.module, trained.model, loader, device, precision, trained.num_classes, "train")


def _device(trained: TrainedModel) -> torch.device:
    device = resolve_device(trained.cfg.train.device)
    prepare_backend(device)
    return device
