"""Using trained weights: loading them into a model, and predicting classes for image files and folders.

Nothing here imports training, optimisers, distributed code or the feature cache. Preprocessing is
the one the weights were trained with (the sidecar's config: a model trained at 160 px is served at
160 px). An image that cannot be decoded gets a row with an ``error`` instead of stopping the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from vggft.config.loading import load_config
from vggft.config.options import check_predict
from vggft.config.schema import Config, DataConfig
from vggft.data.decode import draft_target, open_rgb_draft, resolve_decode
from vggft.data.folders import IMG_EXTENSIONS, display_name, images_in, note_skipped, output_names
from vggft.data.images import DECODE_ERRORS, decode_failure, open_rgb
from vggft.data.loaders import make_loader
from vggft.data.transforms import eval_transform
from vggft.model.build import describe_state_dict, freeze, model_from_weights
from vggft.model.conformal import DEFAULT_METHOD, check_coverage, level_key, prediction_sets
from vggft.model.novelty import mahalanobis_score, penultimate_rows
from vggft.model.weights import read_novelty_stats, read_weights
from vggft.utils.device import (
    autocast_dtype,
    autocast_factory,
    out_of_memory_hint,
    prepare_backend,
    resolve_device,
    resolve_workers,
)
from vggft.utils.errors import DataError, WeightsError
from vggft.utils.logs import log, progress


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

    @property
    def temperature(self) -> float | None:
        """The temperature fitted on the val split at training time (None: none was fitted)."""
        return self.sidecar.get("temperature") if self.sidecar else None

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities, softmax(logits / T), when the sidecar holds a temperature; else softmax."""
        return calibrated_softmax(logits, self.temperature)


def calibrated_softmax(logits: torch.Tensor, temperature: float | None) -> torch.Tensor:
    """softmax(logits / T) over the classes (T None: plain softmax): what predict reports, and what an exported
    file's ``probabilities`` output computes."""
    return torch.softmax(logits.float() / (temperature or 1.0), dim=1)


def load_model(weights: Path, config: Path | None = None, overrides: Sequence[str] = ()) -> TrainedModel:
    """Weights plus their sidecar (if any), the sidecar's config under ``--config``/``--set``. read_weights has
    checked the sidecar: its own digest, and each field (temperature, class names, config) against the weights."""
    saved = read_weights(weights)
    state_dict, sidecar, weights = saved.state_dict, saved.sidecar, saved.path
    try:
        arch, head, num_classes = describe_state_dict(state_dict)
    except WeightsError as err:
        raise WeightsError(f"--weights: '{weights}' is not VGG weights vggft can use: {err}") from None
    except (KeyError, IndexError):
        raise WeightsError(f"--weights: '{weights}' is not a VGG state_dict") from None
    base = sidecar["config"] if sidecar else {"model": {"arch": arch, "head": head}}
    cfg = load_config(config, list(overrides), base=base)
    # What the file holds wins over what a config says about it.
    cfg.model = dataclasses.replace(cfg.model, arch=arch, head=head, num_classes=num_classes, unfreeze=0)
    cfg.data = dataclasses.replace(cfg.data, augment="none")
    try:
        model = model_from_weights(state_dict, arch, head, num_classes)
    except RuntimeError as err:
        raise WeightsError(f"--weights: '{weights}' does not load into {arch} ({str(err).splitlines()[0]})") from None
    freeze(model, cfg.model)  # the same frozen prefix as in training, so cached features are shared
    class_names = [display_name(name) for name in sidecar["class_names"]] if sidecar else None
    return TrainedModel(model, cfg, class_names, num_classes, sidecar, Path(weights))


def collect_images(inputs: Sequence[Path]) -> list[str]:
    """The files named, and every image below the folders named (hidden ones skipped), sorted, once each.

    A file named that is not a regular file (a FIFO) is listed: it gets an error row, never a read.
    """
    if not inputs:
        raise DataError("IMAGE_OR_DIR: no input given; name image files or folders of images")
    found: dict[str, str] = {}
    skipped: list[tuple[str, str]] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            paths = images_in(item, skipped=skipped)
        elif item.exists():
            paths = [str(item)]
        else:
            raise DataError(f"IMAGE_OR_DIR: '{item}' not found; name existing image files or folders")
        for path in paths:
            found.setdefault(os.path.realpath(path), path)
    note_skipped(skipped, ", ".join(str(item) for item in inputs))
    if not found:
        named = ", ".join(f"'{item}'" for item in inputs)
        raise DataError(f"IMAGE_OR_DIR: no image files ({', '.join(IMG_EXTENSIONS)}) in {named}")
    return sorted(found.values())


class _Images(Dataset):
    """(tensor, error message): a zero tensor and the reason for a file that cannot be decoded. JPEGs decoded at
    the DCT scale ``draft`` (``open_rgb_draft``) where given, as extraction decodes them."""

    def __init__(self, paths: list[str], transform, size: int, draft: int | None = None):
        self.paths, self.transform, self.size, self.draft = paths, transform, size, draft

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        try:
            return self.transform(open_rgb_draft(path, self.draft) if self.draft else open_rgb(path)), ""
        except DECODE_ERRORS as err:  # a 0-byte file is "empty", as vggft check-data says
            reason, detail = ("empty", "0 bytes") if _empty(self.paths[index]) else decode_failure(err)
            lines = detail.strip().splitlines()
            return torch.zeros(3, self.size, self.size), f"{reason} ({lines[0]})" if lines else reason


def _empty(path: str) -> bool:
    try:
        return os.path.getsize(path) == 0
    except OSError:
        return False


def image_loader(paths: list[str], data: DataConfig, batch_size: int, device: torch.device) -> DataLoader:
    """Batches of (images preprocessed as ``data``'s eval transform, zeros for a file that cannot be decoded;
    every file's error, '' if none), in the order of ``paths``; loader workers as data.num_workers says. JPEGs
    are decoded as ``data.decode`` has the feature cache decode them on ``device`` (draft or whole), so predict
    scores an image as eval does."""
    draft = draft_target(data) if resolve_decode(data.decode, device) == "draft" else None
    dataset = _Images(paths, eval_transform(data), data.image_size, draft)
    return make_loader(dataset, batch_size, device=device, num_workers=resolve_workers(data, device))


@contextlib.contextmanager
def image_batches(
    trained: TrainedModel, paths: list[str], batch_size: int, desc: str
) -> Iterator[tuple[Iterator[tuple[torch.Tensor, list[str]]], torch.device]]:
    """(batches, device) for running ``trained.model`` (moved to ``device``) over ``paths``: each batch is the
    images on the device (preprocessed as in training, zeros for a file that cannot be decoded) and every
    file's error ('' if none). Loader workers as data.num_workers says; running out of memory inside the
    block is one line naming --batch-size."""
    cfg = trained.cfg
    device = resolve_device(cfg.train.device)
    prepare_backend(device)
    trained.model.to(device)
    loader = image_loader(paths, cfg.data, batch_size, device)
    batches = (
        (images.to(device, non_blocking=True), errors) for images, errors in progress(loader, desc=desc, unit="batch")
    )
    with out_of_memory_hint(device, {"--batch-size": batch_size}):
        yield batches, device


def predict(
    weights: Path,
    inputs: Sequence[Path],
    config: Path | None = None,
    overrides: Sequence[str] = (),
    topk: int = 5,
    batch_size: int = 32,
    coverage: float | None = None,
) -> list[dict]:
    """One row per image, sorted by path: {"path", "top": [{"class", "probability"}, ...], "calibrated",
    "temperature"}, or {"path", "top": [], "error", ...} for a file that cannot be decoded. With novelty
    statistics in the sidecar, "novelty" and "novel" too; with ``coverage``, "set": the conformal set.

    With a temperature in the sidecar the probabilities are calibrated: softmax(logits / T)."""
    check_predict(topk, batch_size)
    check_coverage(coverage)
    paths = collect_images(inputs)
    trained = load_model(weights, config, list(overrides))
    trust = Trust.of(trained, coverage)
    names = trained.names
    k = min(topk, trained.num_classes)
    rows: list[dict] = []
    calibration = {"calibrated": trained.temperature is not None, "temperature": trained.temperature}
    with image_batches(trained, paths, batch_size, "Predicting") as (batches, device), torch.inference_mode():
        autocast = autocast_factory(device, autocast_dtype(device, trained.cfg.train.amp))  # as vggft eval scores
        with penultimate_rows(trained.model) as penultimate:
            for images, errors in batches:
                penultimate.clear()
                with autocast():
                    logits = trained.model(images)
                probs = trained.probabilities(logits)
                batch = top_rows(paths[len(rows) :], probs, errors, names, k, calibration)
                rows += trust.annotate(batch, probs, trust.scores(penultimate), names)
    return rows


@dataclass
class Trust:
    """What predict adds to each row: the conformal set at ``coverage`` (``threshold`` None: every class) and
    the novelty score and flag (``stats`` None: none)."""

    coverage: float | None
    method: str
    threshold: float | None
    stats: dict[str, torch.Tensor] | None
    novelty_threshold: float | None

    @classmethod
    def of(cls, trained: TrainedModel, coverage: float | None) -> Trust:
        """From the sidecar; one note line says what is missing (weights without them predict as before)."""
        sidecar = trained.sidecar or {}
        stats, missing = read_novelty_stats(trained.path, trained.sidecar)
        trust = cls.from_records(sidecar.get("conformal"), sidecar.get("novelty"), coverage, stats)
        lacking = ([] if sidecar.get("conformal") else ["no conformal calibration (no sets)"]) + (
            [missing] if missing else []
        )
        if lacking:
            log.info(f"Note: {'; '.join(lacking)}; vggft calibrate -w {trained.path} adds them")
        return trust

    @classmethod
    def from_records(
        cls, conformal: dict | None, novelty: dict | None, coverage: float | None, stats: dict | None = None
    ) -> Trust:
        """From a sidecar's (or an exported file's) ``conformal`` and ``novelty`` records."""
        coverage = coverage if conformal else None
        threshold = conformal["thresholds"].get(level_key(coverage)) if coverage is not None and conformal else None
        method = conformal["method"] if conformal else DEFAULT_METHOD
        return cls(coverage, method, threshold, stats, (novelty or {}).get("threshold"))

    def scores(self, penultimate: list[torch.Tensor]) -> torch.Tensor | None:
        """The novelty scores of a batch's penultimate rows (None: no statistics)."""
        return mahalanobis_score(torch.cat(penultimate), self.stats) if self.stats is not None else None

    def annotate(
        self, rows: list[dict], probs: torch.Tensor, scores: torch.Tensor | None, names: list[str]
    ) -> list[dict]:
        """Each row with "set" and "unsure" (with a coverage asked), "novelty" and "novel" (with ``scores``)."""
        sets = prediction_sets(probs, self.threshold, self.method) if self.coverage is not None else None
        novelty = scores.tolist() if scores is not None else None
        for index, row in enumerate(rows):
            if "error" in row:
                continue
            if sets is not None:
                row["set"] = [names[c] for c in sets[index]]
                row["unsure"] = len(sets[index]) == len(names)  # the set of every class says nothing
            if novelty is not None:
                row["novelty"] = novelty[index]
                row["novel"] = self.novelty_threshold is not None and novelty[index] > self.novelty_threshold
        return rows


def top_rows(
    paths: Sequence[str], probs: torch.Tensor, errors: list[str], names: list[str], k: int, calibration: dict
) -> list[dict]:
    """predict's rows for one batch: the file ``paths[i]`` with its ``k`` most probable classes (``probs[i]``),
    or with its error; ``calibration`` ({"calibrated", "temperature"}) in each."""
    values, indices = probs.topk(k, dim=1)
    rows: list[dict] = []
    for path, p_row, i_row, error in zip(paths, values.tolist(), indices.tolist(), errors, strict=False):
        if error:
            rows.append({"path": path, "top": [], "error": error, **calibration})
        else:
            top = [{"class": names[i], "probability": p} for p, i in zip(p_row, i_row, strict=True)]
            rows.append({"path": path, "top": top, **calibration})
    return rows
