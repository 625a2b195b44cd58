"""Exporting saved weights to ONNX, torch.export (.pt2) or TorchScript, checked against PyTorch before they are kept.

ONNX (any ONNX runtime) and torch.export's ``.pt2`` (``torch.export.load``, AOTInductor) are the
first-class formats; TorchScript stays as an option while torch has it (``torch.jit`` is deprecated
upstream). The exported file takes a float batch (N, 3, S, S), normalised as in training, and returns
two outputs: ``logits`` and ``probabilities``, softmax(logits / T) with the calibration temperature T of
the sidecar folded into the graph (T = 1 without one): the numbers ``vggft predict`` reports. What a server
needs to prepare images and name classes (size, resize, mean, std, class names, temperature) travels
inside the file: ONNX metadata property ``vggft``, extra file ``vggft.json`` of a .pt2 or TorchScript
archive. The export is written to a temporary file, reloaded, run on a seeded random batch of another
batch size and compared with the PyTorch model, both outputs; only a file within tolerance replaces the
output.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from vggft.data.transforms import preprocessing
from vggft.model.inference import TrainedModel, calibrated_softmax, load_model
from vggft.model.weights import sidecar_path
from vggft.utils.errors import ConfigError, OutputError, VggftError, WeightsError, first_line
from vggft.utils.files import atomic_path

FORMATS = ("onnx", "pt2", "torchscript")
SUFFIX = {"onnx": ".onnx", "pt2": ".pt2", "torchscript": ".torchscript.pt"}
TOLERANCE = 1e-4
EXPORT_FORMAT = "vggft-export/2"  # 2: the probabilities output and the temperature (1 had logits only)
OUTPUTS = ("logits", "probabilities")
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
    model = WithProbabilities(trained.model.cpu().eval(), trained.temperature).eval()
    size = trained.cfg.data.image_size
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    # A different batch size from the traced one: the check also proves the batch axis is free.
    check = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = model(check)
    metadata = json.dumps(_metadata(trained))

    writer = {"onnx": _onnx, "pt2": _pt2, "torchscript": _torchscript}[fmt]
    with atomic_path(out) as tmp:
        got = writer(model, example, check, tmp, metadata)
        diff = max(float((g.float() - e.float()).abs().max()) for g, e in zip(got, expected, strict=True))
        if not diff <= TOLERANCE:  # also catches NaN
            other = "pt2" if fmt == "onnx" else "onnx"
            raise WeightsError(
                f"{out}: the {fmt} export differs from PyTorch by {diff:.1e} (tolerance {TOLERANCE:.0e}); "
                f"nothing was written; try --format {other}, or report the torch version"
            )
    return out, diff


def _check_output(out: Path, weights: Path) -> None:
    if out.is_dir():
        raise OutputError(f"--out: '{out}' is a folder; give a file path such as {default_output(weights, 'onnx')}")
    if out.resolve() in (weights.resolve(), sidecar_path(weights).resolve()):
        raise OutputError(f"--out: '{out}' would overwrite the weights or their sidecar; choose another path")


class WithProbabilities(torch.nn.Module):
    """``model`` with a second output: (logits, softmax(logits / T)), T the calibration temperature (None: 1),
    a constant of the exported graph."""

    def __init__(self, model: torch.nn.Module, temperature: float | None):
        super().__init__()
        self.model, self.temperature = model, temperature

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(images)
        return logits, calibrated_softmax(logits, self.temperature)


def _metadata(trained: TrainedModel) -> dict:
    names = trained.names
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
        "temperature 1 when null (what vggft predict reports)",
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
                output_names=list(OUTPUTS),
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
    return tuple(torch.from_numpy(out) for out in session.run(list(OUTPUTS), {"images": check.numpy()}))
