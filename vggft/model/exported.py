"""Predicting with an ONNX file written by ``vggft export``: the rows ``vggft predict`` gives for the .pt.

The file says how to serve it (ONNX metadata property ``vggft``): class names, the eval transform
(image size, resize, normalisation) and the temperature, which its ``probabilities`` output already
applies. Images are preprocessed by the same transform as for the .pt and run by onnxruntime on the CPU,
so the rows match the .pt's (same top-k; probabilities within float error). Only ONNX is read here: a
``.pt2`` or TorchScript archive loads through pickle, which vggft never runs on a file it is handed.
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
from vggft.model.export import EXPORT_FORMAT, OUTPUTS, MissingExtraError
from vggft.model.inference import collect_images, image_loader, top_rows
from vggft.model.inference import predict as predict_weights
from vggft.model.safe_load import check_weights_file
from vggft.model.weights import TEMPERATURE_RANGE
from vggft.utils.errors import ConfigError, WeightsError, first_line
from vggft.utils.logs import progress

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

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """The file's ``probabilities`` output, softmax(logits / T), for a preprocessed batch."""
        (probs,) = self.session.run([OUTPUTS[1]], {"images": images.cpu().numpy()})
        return torch.from_numpy(probs)


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
    if not set(OUTPUTS) <= outputs or [i.name for i in session.get_inputs()] != ["images"]:
        raise WeightsError(
            f"--weights: '{path}' lacks the images input or the {', '.join(OUTPUTS)} outputs; {EXPORT_FIX}"
        )
    return ExportedModel(session, meta["class_names"], meta["data"], meta["temperature"], path)


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
    if fmt != EXPORT_FORMAT:
        raise WeightsError(
            f"--weights: '{path}' has vggft metadata of format {fmt!r}, not {EXPORT_FORMAT} (an older export has "
            f"no probabilities output, a newer vggft wrote it); {EXPORT_FIX}"
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
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise WeightsError(f"--weights: '{path}' has incomplete or inconsistent vggft metadata; {EXPORT_FIX}")
    return {"class_names": names, "data": data, "temperature": temperature}


def _positive_int(value: object) -> bool:
    return type(value) is int and value > 0


def predict_exported(path: Path, inputs: Sequence[Path], topk: int = 5, batch_size: int = 32) -> list[dict]:
    """``vggft predict`` with an .onnx file from vggft export: the same rows as with the .pt it came from."""
    check_predict(topk, batch_size)
    paths = collect_images(inputs)
    exported = load_exported(path)
    k = min(topk, len(exported.names))
    calibration = {"calibrated": exported.temperature is not None, "temperature": exported.temperature}
    loader = image_loader(paths, exported.data, batch_size, torch.device("cpu"))
    rows: list[dict] = []
    for images, errors in progress(loader, desc="Predicting", unit="batch"):
        rows += top_rows(paths[len(rows) :], exported.probabilities(images), errors, exported.names, k, calibration)
    return rows


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
    carries its own preprocessing, so ``--config``/``--set`` are refused there (and ``coverage``: not yet)."""
    if not is_exported(weights):
        return predict_weights(weights, inputs, config, overrides, topk=topk, batch_size=batch_size, coverage=coverage)
    if coverage is not None:
        raise ConfigError(f"--coverage: '{weights}' is an exported file; pass the .pt weights it came from")
    if config is not None or overrides:
        raise ConfigError(
            f"--config/--set: '{weights}' is an exported file, which carries its own preprocessing and runs on "
            "the CPU; leave --config and --set out"
        )
    return predict_exported(weights, inputs, topk=topk, batch_size=batch_size)
