"""Predicting with an ONNX file written by ``vggft export``: the rows ``vggft predict`` gives for the .pt.

The file says how to serve it (ONNX metadata property ``vggft``): class names, the eval transform
(image size, resize, normalisation), the temperature, which its ``probabilities`` output already
applies, and (format 3) the novelty threshold of its ``novelty`` output and the conformal thresholds of
the coverages in ``conformal.EXPORTED_LEVELS``. Images are preprocessed by the same transform as for the .pt
and run by onnxruntime on the CPU, so the rows match the .pt's (same top-k; probabilities and novelty within
float error). Only ONNX is read here: a ``.pt2`` or TorchScript archive loads through pickle, which vggft
never runs on a file it is handed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vggft.config.options import check_predict
from vggft.config.schema import DataConfig
from vggft.model.conformal import EXPORTED_LEVELS, level_key
from vggft.model.export import NOVELTY_OUTPUT, OUTPUTS, READABLE_EXPORTS, MissingExtraError
from vggft.model.inference import Trust, collect_images, image_loader, top_rows
from vggft.model.inference import predict as predict_weights
from vggft.model.safe_load import check_weights_file
from vggft.model.weights import TEMPERATURE_RANGE
from vggft.utils.errors import ConfigError, WeightsError, first_line
from vggft.utils.logs import log, progress

EXPORT_FIX = "export the weights with vggft export --weights MODEL.pt --format onnx, or predict with the .pt weights"


def is_exported(weights: Path) -> bool:
    """Whether ``--weights`` names an exported file (by its name: .onnx, .pt2, .torchscript.pt)."""
    name = Path(weights).name.lower()
    return name.endswith((".onnx", ".pt2", ".torchscript.pt"))


@dataclass
class ExportedModel:
    """An ONNX file from vggft export, opened with onnxruntime, and what its metadata says."""

    session: Any  # onnxruntime.InferenceSession
    names: list[str]
    data: DataConfig  # the eval transform's settings: image_size, resize, normalize
    temperature: float | None
    path: Path
    conformal: dict | None = None  # thresholds for EXPORTED_LEVELS (format 3)
    novelty: dict | None = None  # the novelty record; the file then has the novelty output

    def outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The file's ``probabilities`` output, softmax(logits / T), for a preprocessed batch, and its ``novelty``
        output (None: the file has none)."""
        names = [OUTPUTS[1], NOVELTY_OUTPUT] if self.novelty else [OUTPUTS[1]]
        got = [torch.from_numpy(out) for out in self.session.run(names, {"images": images.cpu().numpy()})]
        return got[0], got[1] if self.novelty else None


def load_exported(path: Path) -> ExportedModel:
    """An .onnx file written by vggft export (format vggft-export/2), ready to run; one line (exit 4) for any
    other file, exit 1 naming the extra when onnxruntime is not installed."""
    path = Path(path)
    if not path.name.lower().endswith(".onnx"):
        raise WeightsError(
            f"--weights: '{path}' is a torch.export or TorchScript archive, which loads through pickle and which "
            "vggft predict does not run; predict with the .pt weights, or export them with --format onnx"
        )
    check_weights_file(path, "--weights", "pass the .onnx file that vggft export wrote")
    try:
        import onnxruntime
    except ImportError:
        raise MissingExtraError(
            f"--weights: '{path}' is an ONNX file, which needs onnxruntime (not installed); "
            'pip install "vggft[onnx]", or predict with the .pt weights'
        ) from None
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own types for a file it cannot read; one line for the user
        raise WeightsError(
            f"--weights: '{path}' is not an ONNX model onnxruntime can load ({first_line(err)}); {EXPORT_FIX}"
        ) from None
    meta = _metadata(path, session.get_modelmeta().custom_metadata_map.get("vggft"))
    outputs = {out.name for out in session.get_outputs()}
    wanted = [*OUTPUTS, NOVELTY_OUTPUT] if meta["novelty"] else list(OUTPUTS)
    if not set(wanted) <= outputs or [i.name for i in session.get_inputs()] != ["images"]:
        raise WeightsError(
            f"--weights: '{path}' lacks the images input or the {', '.join(wanted)} outputs; {EXPORT_FIX}"
        )
    return ExportedModel(
        session, meta["class_names"], meta["data"], meta["temperature"], path, meta["conformal"], meta["novelty"]
    )


def _metadata(path: Path, text: str | None) -> dict:
    """The file's vggft metadata, checked: class names, a DataConfig for the eval transform, the temperature."""
    if text is None:
        raise WeightsError(
            f"--weights: '{path}' has no vggft metadata (it was not written by vggft export); {EXPORT_FIX}"
        )
    try:
        meta = json.loads(text)
    except ValueError:
        meta = None
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt not in READABLE_EXPORTS:
        raise WeightsError(
            f"--weights: '{path}' has vggft metadata of format {fmt!r}, not {' or '.join(READABLE_EXPORTS)} (an "
            f"older export has no probabilities output, a newer vggft wrote it); {EXPORT_FIX}"
        )
    low, high = TEMPERATURE_RANGE  # what a sidecar may hold, so what an export of it holds
    try:
        names, temperature = [str(name) for name in meta["class_names"]], meta["temperature"]
        data = DataConfig(image_size=meta["image_size"], resize=meta["resize"], normalize=meta["normalize"])
        ok = (
            len(names) == len(set(names)) == meta["num_classes"] > 0
            and _positive_int(data.image_size)
            and (data.resize is None or _positive_int(data.resize))
            and data.normalize in ("imagenet", "symmetric")
            and (temperature is None or (type(temperature) in (int, float) and low <= temperature <= high))
        )
        conformal, novelty = meta.get("conformal"), meta.get("novelty")  # absent in format 2
        ok = ok and _trust_ok(conformal, novelty)
    except (KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise WeightsError(f"--weights: '{path}' has incomplete or inconsistent vggft metadata; {EXPORT_FIX}")
    return {"class_names": names, "data": data, "temperature": temperature, "conformal": conformal, "novelty": novelty}


def _trust_ok(conformal: object, novelty: object) -> bool:
    """The records export writes: ``conformal`` null or as a sidecar's, with thresholds for the exported levels
    only; ``novelty`` null or a Mahalanobis record as a sidecar's, its statistics in the graph."""
    from vggft.model.weights import check_trust

    if novelty is not None and (not isinstance(novelty, dict) or novelty.get("score") != "mahalanobis"):
        return False
    try:
        check_trust({"conformal": conformal, "novelty": novelty}, Path("metadata"), stats_in_graph=True)
    except WeightsError:
        return False
    return not isinstance(conformal, dict) or set(conformal["thresholds"]) <= {level_key(c) for c in EXPORTED_LEVELS}


def _positive_int(value: object) -> bool:
    return type(value) is int and value > 0


def predict_exported(
    path: Path, inputs: Sequence[Path], topk: int = 5, batch_size: int = 32, coverage: float | None = None
) -> list[dict]:
    """``vggft predict`` with an .onnx file from vggft export: the same rows as with the .pt it came from (the
    novelty score in float32; sets for the coverages the file lists)."""
    check_predict(topk, batch_size)
    paths = collect_images(inputs)
    exported = load_exported(path)
    trust = _trust(exported, coverage)
    k = min(topk, len(exported.names))
    calibration = {"calibrated": exported.temperature is not None, "temperature": exported.temperature}
    loader = image_loader(paths, exported.data, batch_size, torch.device("cpu"))
    rows: list[dict] = []
    for images, errors in progress(loader, desc="Predicting", unit="batch"):
        probs, scores = exported.outputs(images)
        batch = top_rows(paths[len(rows) :], probs, errors, exported.names, k, calibration)
        rows += trust.annotate(batch, probs, scores.double() if scores is not None else None, exported.names)
    return rows


def _trust(exported: ExportedModel, coverage: float | None) -> Trust:
    """The sets and novelty flags the file supports; one note line for what it lacks, an error for a coverage
    it has no threshold for."""
    levels = ", ".join(level_key(c) for c in EXPORTED_LEVELS)
    if coverage is not None and exported.conformal and level_key(coverage) not in exported.conformal["thresholds"]:
        raise ConfigError(
            f"--coverage: '{exported.path}' holds conformal thresholds for {levels} only; ask one of those, or "
            "predict with the .pt weights for any level from 0.50 to 0.99"
        )
    lacking = ([] if exported.conformal else ["no conformal calibration (no sets)"]) + (
        [] if exported.novelty else ["no novelty output"]
    )
    if lacking:
        log.info(f"Note: {'; '.join(lacking)} in '{exported.path}'; calibrate the weights, then export them again")
    return Trust.from_records(exported.conformal, exported.novelty, coverage)


def predict(
    weights: Path,
    inputs: Sequence[Path],
    config: Path | None = None,
    overrides: Sequence[str] = (),
    topk: int = 5,
    batch_size: int = 32,
    coverage: float | None = None,
) -> list[dict]:
    """``vggft predict``: with saved weights (vggft.model.inference.predict), or with an exported file, which
    carries its own preprocessing, so ``--config``/``--set`` are refused there."""
    if not is_exported(weights):
        return predict_weights(weights, inputs, config, overrides, topk=topk, batch_size=batch_size, coverage=coverage)
    if config is not None or overrides:
        raise ConfigError(
            f"--config/--set: '{weights}' is an exported file, which carries its own preprocessing and runs on "
            "the CPU; leave --config and --set out"
        )
    return predict_exported(weights, inputs, topk=topk, batch_size=batch_size, coverage=coverage)
