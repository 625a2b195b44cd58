"""Exporting saved weights to ONNX, torch.export (.pt2) or TorchScript, checked against PyTorch before they are kept.

ONNX (any ONNX runtime) and torch.export's ``.pt2`` (``torch.export.load``, AOTInductor) are the
first-class formats; TorchScript stays as an option while torch has it (``torch.jit`` is deprecated
upstream). The exported file takes a float batch (N, 3, S, S), normalised as in training, and returns
two outputs: ``logits`` and ``probabilities``, softmax(logits / T) with the calibration temperature T of
the sidecar folded into the graph (T = 1 without one): the numbers ``vggft predict`` reports; with novelty
statistics beside the weights, a third: ``novelty``, the Mahalanobis score of the penultimate row (the
statistics folded into the graph as constants). What a server needs to prepare images, name classes and
read the answers (size, resize, mean, std, class names, temperature, the novelty threshold, the conformal
thresholds for the coverages in ``EXPORTED_LEVELS``) travels inside the file: ONNX metadata property
``vggft``, extra file ``vggft.json`` of a .pt2 or TorchScript archive. The export is written to a
temporary file, reloaded, run on a seeded random batch of another batch size and compared with the PyTorch
model, every output; only a file within tolerance replaces the output.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from vggft.data.transforms import preprocessing
from vggft.model.build import layer_sequence
from vggft.model.conformal import EXPORTED_LEVELS, level_key
from vggft.model.inference import TrainedModel, calibrated_softmax, load_model
from vggft.model.weights import read_novelty_stats, sidecar_path
from vggft.utils.errors import ConfigError, OutputError, VggftError, WeightsError, first_line
from vggft.utils.files import atomic_path

FORMATS = ("onnx", "pt2", "torchscript")
SUFFIX = {"onnx": ".onnx", "pt2": ".pt2", "torchscript": ".torchscript.pt"}
TOLERANCE = 1e-4
# 3: the novelty output and the conformal thresholds (2: the probabilities output and the temperature; 1: logits)
EXPORT_FORMAT = "vggft-export/3"
READABLE_EXPORTS = ("vggft-export/2", EXPORT_FORMAT)
OUTPUTS = ("logits", "probabilities")
NOVELTY_OUTPUT = "novelty"
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # torch.onnx.export needs onnxscript since torch 2.9


class MissingExtraError(VggftError):
    """An optional dependency that a requested feature needs is not installed."""


def default_format() -> str:
    """onnx when its optional packages are installed, else pt2 (torch alone)."""
    return "pt2" if _missing_onnx_packages() else "onnx"


def _missing_onnx_packages() -> list[str]:
    return [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]


def default_output(weights: Path, fmt: str) -> Path:
    """Beside the weights: models/VGG16.pt -> models/VGG16.onnx, .pt2 or .torchscript.pt."""
    weights = Path(weights)
    return weights.with_name(weights.stem + SUFFIX[fmt])


def export(
    weights: Path,
    fmt: str | None = None,
    out: Path | None = None,
    config: Path | None = None,
    overrides: Sequence[str] = (),
) -> tuple[Path, float]:
    """Write ``weights`` as ``fmt`` (onnx, pt2 or torchscript; None: onnx if its packages are installed, else
    pt2); return (path, max |exported - PyTorch|)."""
    fmt = default_format() if fmt is None else fmt.strip().lower()
    if fmt not in FORMATS:
        raise ConfigError(f"--format: expected one of {', '.join(FORMATS)}, got '{fmt}'")
    if fmt == "onnx":
        missing = _missing_onnx_packages()
        if missing:
            raise MissingExtraError(
                f"--format onnx: needs the optional packages {', '.join(ONNX_PACKAGES)} "
                f'({", ".join(missing)} not installed); pip install "vggft[onnx]" '
                f"(or pip install {' '.join(ONNX_PACKAGES)})"
            )
    weights = Path(weights)
    out = Path(out) if out is not None else default_output(weights, fmt)
    _check_output(out, weights)
    trained = load_model(weights, config, list(overrides))
    stats, _ = read_novelty_stats(trained.path, trained.sidecar)
    model = Served(trained.model.cpu().eval(), trained.temperature, stats).eval()
    size = trained.cfg.data.image_size
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    # A different batch size from the traced one: the check also proves the batch axis is free.
    check = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = model(check)
    metadata = json.dumps(_metadata(trained, model.novelty))

    writer = {"onnx": _onnx, "pt2": _pt2, "torchscript": _torchscript}[fmt]
    with atomic_path(out) as tmp:
        got = writer(model, example, check, tmp, metadata)
        diff = max(_difference(g, e) for g, e in zip(got, expected, strict=True))
        if not diff <= TOLERANCE:  # also catches NaN
            other = "pt2" if fmt == "onnx" else "onnx"
            raise WeightsError(
                f"{out}: the {fmt} export differs from PyTorch by {diff:.1e} (tolerance {TOLERANCE:.0e}); "
                f"nothing was written; try --format {other}, or report the torch version"
            )
    return out, diff


def _difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected|, relative to |expected| where that is above 1 (the novelty score runs into the
    thousands; float32 holds it to about 1e-7 of its size)."""
    got, expected = got.double(), expected.double()
    return float(((got - expected).abs() / expected.abs().clamp(min=1.0)).max())


def _check_output(out: Path, weights: Path) -> None:
    if out.is_dir():
        raise OutputError(f"--out: '{out}' is a folder; give a file path such as {default_output(weights, 'onnx')}")
    if out.resolve() in (weights.resolve(), sidecar_path(weights).resolve()):
        raise OutputError(f"--out: '{out}' would overwrite the weights or their sidecar; choose another path")


class Served(torch.nn.Module):
    """``model`` with more outputs: (logits, softmax(logits / T)), T the calibration temperature (None: 1), and
    with novelty ``stats``, the Mahalanobis score of the penultimate row (``novelty.mahalanobis_score``, in
    float32): constants of the exported graph."""

    to_whitened: torch.Tensor
    centres: torch.Tensor

    def __init__(self, model: torch.nn.Module, temperature: float | None, stats: dict[str, torch.Tensor] | None):
        super().__init__()
        layers = [module for _, module in layer_sequence(model)]
        self.body = torch.nn.Sequential(*layers[:-1])
        self.last: torch.nn.Module = layers[-1]  # the last Linear, which takes the penultimate row
        self.temperature, self.novelty = temperature, stats is not None
        if stats is not None:
            whiten = stats["whiten"].double()
            centres = stats["means"].double() @ whiten
            self.register_buffer("to_whitened", (stats["projection"].double() @ whiten).float())
            self.register_buffer("centres", centres[~centres.isnan().any(dim=1)].float())  # classes with rows

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rows = self.body(images)
        logits = self.last(rows)
        probabilities = calibrated_softmax(logits, self.temperature)
        if not self.novelty:
            return logits, probabilities
        whitened = rows.float() @ self.to_whitened
        distances = (whitened.unsqueeze(1) - self.centres.unsqueeze(0)).square().sum(dim=2)
        return logits, probabilities, distances.min(dim=1).values

    def output_names(self) -> list[str]:
        return [*OUTPUTS, NOVELTY_OUTPUT] if self.novelty else list(OUTPUTS)


def _metadata(trained: TrainedModel, novelty: bool) -> dict:
    names, sidecar = trained.names, trained.sidecar or {}
    conformal = sidecar.get("conformal")
    if conformal:
        levels = {level_key(c): conformal["thresholds"].get(level_key(c)) for c in EXPORTED_LEVELS}
        conformal = {"method": conformal["method"], "count": conformal["count"], "thresholds": levels}
    record = sidecar.get("novelty") if novelty else None
    return {
        "format": EXPORT_FORMAT,
        "weights_file": trained.path.name,
        "arch": trained.cfg.model.arch,
        "head": trained.cfg.model.head,
        "num_classes": trained.num_classes,
        "class_names": names,
        "temperature": trained.temperature,  # null: none was fitted; probabilities is then plain softmax
        "input": "images: float32 (N, 3, image_size, image_size), RGB in [0, 1], then (x - mean) / std",
        "outputs": "logits: float32 (N, num_classes); probabilities: softmax(logits / temperature), "
        "temperature 1 when null (what vggft predict reports); novelty (when novelty is not null): float32 (N,), "
        "the image is unlike the training images when it is above novelty.threshold",
        "novelty": {key: record[key] for key in ("score", "threshold", "pass_rate")} if record else None,
        "conformal": conformal,  # the set at coverage c: classes whose score (lac: 1 - p) is at most thresholds[c]
        **preprocessing(trained.cfg.data),  # image_size, resize, normalize, mean, std
    }


def _pt2(model, example, check, tmp: Path, metadata: str) -> tuple[torch.Tensor, ...]:
    """torch.export's ExportedProgram with a free batch axis, saved with torch.export.save and loaded back."""
    try:
        program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    except Exception as err:  # the exporter raises many types; one line for the user
        raise WeightsError(f"--format pt2: torch.export failed ({first_line(err)}); try --format onnx") from None
    torch.export.save(program, str(tmp), extra_files={"vggft.json": metadata})
    loaded = torch.export.load(str(tmp))
    with torch.inference_mode():
        return tuple(loaded.module()(check))


def _torchscript(model, example, check, tmp: Path, metadata: str) -> tuple[torch.Tensor, ...]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream, still the format asked for
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(tmp), _extra_files={"vggft.json": metadata})
        loaded = torch.jit.load(str(tmp), map_location="cpu")
    with torch.inference_mode():
        return tuple(loaded(check))


def _onnx(model, example, check, tmp: Path, metadata: str) -> tuple[torch.Tensor, ...]:
    import onnxruntime

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracing chatter
        try:
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                verbose=False,
                external_data=False,
                input_names=["images"],
                output_names=model.output_names(),
                dynamic_shapes=({0: torch.export.Dim("batch")},),
            )
        except Exception as err:  # the exporter raises many types; one line for the user
            raise WeightsError(
                f"--format onnx: torch.onnx.export failed ({first_line(err)}); try --format pt2"
            ) from None
    assert program is not None  # dynamo=True always returns an ONNXProgram (None is the TorchScript exporter's)
    program.model.metadata_props["vggft"] = metadata
    program.save(str(tmp), external_data=False)  # one self-contained file
    session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    outputs = session.run(model.output_names(), {"images": check.numpy()})
    return tuple(torch.from_numpy(out) for out in outputs)
