"""``vggft explain``: Grad-CAM heatmaps (Selvaraju et al. 2017) of where the network looked.

The map is taken at the output of the last ReLU of ``features`` (``features[29]`` in VGG-16, after
conv5_3): each of its K channels A_k is weighted by the spatial mean of d(class score)/d(A_k), the
weighted sum goes through a ReLU (only evidence *for* the class), is upsampled bilinearly to the
model's input size and divided by its maximum, so it lies in [0, 1] (a map with no positive evidence
stays all zero). The class score is the logit of the predicted class, or of ``--class``.

Inference-side only: nothing here imports training, the feature cache or (until a PNG is drawn)
matplotlib. Preprocessing is the sidecar's, as in ``predict``.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vggft.config.options import check_batch_size
from vggft.data.transforms import normalization
from vggft.model.build import layer_sequence
from vggft.model.inference import TrainedModel, collect_images, image_batches, load_model
from vggft.utils.device import autocast_dtype, autocast_factory
from vggft.utils.errors import ConfigError, OutputError
from vggft.utils.files import atomic_path


def last_relu(model: nn.Module) -> str:
    """The name (``features.N``) of the last ReLU in ``model.features``: 29 in vgg16, 20 in vgg11, 42 in vgg16_bn."""
    features = model.features
    assert isinstance(features, nn.Sequential)  # VGG's backbone
    names = [f"features.{i}" for i, m in enumerate(features) if isinstance(m, nn.ReLU)]
    if not names:
        raise ConfigError("the model's features hold no ReLU; Grad-CAM needs a VGG backbone")
    return names[-1]


@dataclass
class Cams:
    maps: torch.Tensor  # (N, H, W) float32 in [0, 1], on the CPU
    logits: torch.Tensor  # (N, num_outputs), on the CPU
    classes: torch.Tensor  # (N,) the class each map explains


def grad_cam(
    model: nn.Module,
    images: torch.Tensor,
    classes: torch.Tensor | Sequence[int] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> Cams:
    """Grad-CAM maps of ``images`` (a normalised batch on the model's device) for ``classes`` (default: predicted).

    The network is run as two halves at the last ReLU of ``features``: the first without gradients (under
    ``autocast``: most of the work, in the precision eval and predict use), the second in fp32 from that
    activation, which alone requires a gradient; samples do not interact in eval mode, so one backward pass of
    the summed scores gives every sample's own gradient.
    """
    model.eval()
    layers = layer_sequence(model)
    cut = [name for name, _ in layers].index(last_relu(model)) + 1
    head, tail = nn.Sequential(*[m for _, m in layers[:cut]]), nn.Sequential(*[m for _, m in layers[cut:]])
    with torch.no_grad(), autocast():
        activations = head(images.float())
    activations = activations.detach().float().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = tail(activations).float()
        chosen = logits.argmax(dim=1) if classes is None else torch.as_tensor(classes, device=logits.device).long()
        score = logits.gather(1, chosen[:, None]).sum()
        (gradients,) = torch.autograd.grad(score, activations)
    weights = gradients.mean(dim=(2, 3), keepdim=True)  # global-average-pooled gradients: one weight per channel
    cam = F.relu((weights * activations.detach()).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(dim=1)[:, None, None]
    cam = torch.where(peak > 0, cam / peak.clamp(min=torch.finfo(cam.dtype).tiny), torch.zeros_like(cam))
    return Cams(cam.float().cpu(), logits.detach().cpu(), chosen.cpu())


def class_index(trained: TrainedModel, name: str | None) -> int | None:
    """The output index of ``--class NAME`` (None: explain the predicted class)."""
    if name is None:
        return None
    names = trained.names
    if name not in names:
        raise ConfigError(
            f"--class: '{name}' is not a class of '{trained.path}' ({', '.join(names)}); "
            "name one of them, or leave --class out to explain the predicted class"
        )
    return names.index(name)


def output_stems(paths: Sequence[str]) -> list[str]:
    """A file stem per image, unique in one folder: cat.1, or test_cat_cat.1 where two images share a stem."""
    stems = [Path(p).stem for p in paths]
    clashing = {s for s, n in Counter(stems).items() if n > 1}
    unique, taken = [], set()
    for path, stem in zip(paths, stems, strict=True):
        if stem in clashing:
            parents = [part for part in Path(path).parent.parts[-2:] if part not in ("/", "..", ".")]
            stem = "_".join([*parents, stem])
        candidate, n = stem, 1
        while candidate in taken:
            n += 1
            candidate = f"{stem}-{n}"
        taken.add(candidate)
        unique.append(candidate)
    return unique


def explain(
    weights: Path,
    inputs: Sequence[Path],
    config: Path | None = None,
    overrides: Sequence[str] = (),
    *,
    class_name: str | None = None,
    out: Path = Path("explain"),
    batch_size: int = 16,
) -> list[dict]:
    """Grad-CAM of every image under ``inputs``: ``<stem>.cam.png`` (overlay) and ``<stem>.cam.npy`` (the map,
    float32, model-input size) in ``out``. One row per image, sorted by path: {"path", "class", "probability",
    "predicted", "predicted_probability", "overlay", "cam", "calibrated", "evidence"} ("evidence": false when
    the map is all zero), or {"path", "error"}."""
    check_batch_size(batch_size)
    paths = collect_images(inputs)
    trained = load_model(weights, config, list(overrides))
    wanted = class_index(trained, class_name)
    _make_folder(Path(out))
    stems = output_stems(paths)
    rows: list[dict] = []
    with image_batches(trained, paths, batch_size, "Explaining") as (batches, device):
        autocast = autocast_factory(device, autocast_dtype(device, trained.cfg.train.amp))
        for images, errors in batches:
            start = len(rows)
            good = [i for i, error in enumerate(errors) if not error]
            classes = None if wanted is None else [wanted] * len(good)
            cams = grad_cam(trained.model, images[good], classes, autocast) if good else None
            for i, error in enumerate(errors):
                path = paths[start + i]
                if error:
                    rows.append({"path": path, "error": error})
                    continue
                j = good.index(i)
                assert cams is not None  # drawn for the batch's good images, i among them
                rows.append(_write_one(trained, images[i], cams, j, out, stems[start + i], path))
    return rows


def _make_folder(out: Path) -> None:
    """The output folder, made before any work (an unwritable one is one line, not a traceback per image)."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out: '{out}' is a file; give a folder for the heatmaps")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"--out: cannot make '{out}' ({err.strerror}); choose another folder") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"--out: '{out}' is not writable; choose another folder")


def _write_one(trained: TrainedModel, image: torch.Tensor, cams: Cams, j: int, out: Path, stem: str, path: str) -> dict:
    from vggft.reporting.plots import NO_EVIDENCE, save_cam_overlay

    probs = trained.probabilities(cams.logits[j : j + 1])[0]
    names = trained.names
    chosen, predicted = int(cams.classes[j]), int(probs.argmax())
    title = f"{names[chosen]} {float(probs[chosen]):.2f}"
    if chosen != predicted:
        title += f" (predicted {names[predicted]} {float(probs[predicted]):.2f})"
    evidence = bool(cams.maps[j].any())
    if not evidence:
        title += f"\n{NO_EVIDENCE}: the Grad-CAM map is all zero"
    cam_path = out / f"{stem}.cam.npy"
    with atomic_path(cam_path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, cams.maps[j].numpy().astype(np.float32))
    mean, std = normalization(trained.cfg.data)
    overlay = save_cam_overlay(image, cams.maps[j], mean, std, f"{Path(path).name}: {title}", out / f"{stem}.cam.png")
    return {
        "path": path,
        "class": names[chosen],
        "probability": float(probs[chosen]),
        "predicted": names[predicted],
        "predicted_probability": float(probs[predicted]),
        "overlay": str(overlay),
        "cam": str(cam_path),
        "calibrated": trained.temperature is not None,
        "evidence": evidence,
    }
