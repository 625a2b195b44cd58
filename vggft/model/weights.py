"""Trained weights and their sidecar, written as one unit: the weights first, then the sidecar, which records
the weights' SHA-256; loading checks it, so a crash between the two renames is caught, never mislabelled.
The format versions read here keep older files loadable."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vggft import __version__
from vggft.config.loading import migrate_config
from vggft.config.schema import Config
from vggft.model.checkpoints import (
    CHECKPOINT_FORMAT,
    LIGHT_KIND,
    checked_checkpoint,
    rebuild_from_checkpoint,
    trainable_state,
)
from vggft.model.fingerprint import frozen_fingerprint
from vggft.model.safe_load import check_weights_file, read_state_dict
from vggft.utils.errors import OutputError, WeightsError
from vggft.utils.files import check_name_length, existing_parent, file_digest, save_json, save_torch

WEIGHTS_FORMAT = "vggft-weights/2"


# Formats this version reads: 1 (vggft 0.1: no digest, split in a separate manifest file) and 2.
READABLE_WEIGHTS = ("vggft-weights/1", WEIGHTS_FORMAT)


def sidecar_path(weights: Path) -> Path:
    return Path(weights).with_suffix(".json")


def check_writable(path: Path) -> None:
    """Fail before any work if the output cannot be written (creating nothing yet)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"output.weights: '{path}' is a folder; give a file path such as models/VGG16.pt")
    if path.suffix.lower() == ".json":
        raise OutputError(
            f"output.weights: '{path}' ends in .json, the name of its own sidecar; "
            "give the weights a .pt name such as models/VGG16.pt"
        )
    check_name_length(path, "output.weights", spare=max(0, len(".json") - len(path.suffix)))  # and its sidecar
    existing = existing_parent(path.parent)
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(
            f"output.weights: cannot write to '{path.parent}' ('{existing}' is not a writable folder); "
            "choose another path with --set output.weights=PATH"
        )


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors: loadable by plain torchvision code on any machine."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save_trained(
    model: nn.Module,
    weights: Path,
    cfg: Config,
    class_names: list[str],
    *,
    metrics: dict | None = None,
    split: dict | None = None,
    temperature: float | None = None,
    trainable: dict[str, torch.Tensor] | None = None,
    frozen: str | None = None,
) -> Path:
    """Write the weights, then the sidecar that records their digest (and a pool's ``split``, and the softmax
    ``temperature`` fitted on val, if any), each atomically. With ``output.full_weights: false`` the weights
    file holds the ``trainable`` tensors and the ``frozen`` part's fingerprint only (``light_body``).

    A kill between the two renames leaves new weights beside the old sidecar: its digest no longer
    matches, and loading says so instead of naming the classes wrongly.
    """
    from vggft.data.transforms import preprocessing

    weights = Path(weights)
    body = (
        plain_state_dict(model) if cfg.output.full_weights else light_body(model, cfg, class_names, trainable, frozen)
    )
    digest = save_torch(body, weights, sha256=True)
    config = cfg.to_dict()
    config["data"]["root"] = str(Path(cfg.data.root).resolve())  # usable from any working folder
    sidecar = {
        "format": WEIGHTS_FORMAT,
        "vggft_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "weights_file": weights.name,
        "weights_sha256": digest,
        "arch": cfg.model.arch,
        "head": cfg.model.head,
        "num_classes": cfg.model.num_classes or len(class_names),
        "class_names": class_names,
        **preprocessing(cfg.data),
        "split": split,
        "temperature": temperature,
        "config": config,
        "metrics": metrics or {},
    }
    path = sidecar_path(weights)
    save_json(sidecar, path)
    return path


def light_body(
    model: nn.Module, cfg: Config, class_names: list[str], trainable: dict | None, frozen: str | None
) -> dict:
    """What training changed (``trainable``, by default every parameter that learns) and the fingerprint of
    the rest (``frozen``), with the config that rebuilds the rest from model.weights: a checkpoint of its own
    kind, read like a run's best.pt."""
    trainable = trainable if trainable is not None else trainable_state(model)
    return {
        "format": CHECKPOINT_FORMAT,
        "vggft_version": __version__,
        "kind": LIGHT_KIND,
        "config": cfg.to_dict(),
        "class_names": class_names,
        "base_weights": cfg.model.weights,  # where the frozen part comes from: a torchvision name or a file
        "frozen_fingerprint": frozen or frozen_fingerprint(model, trainable),
        "model": trainable,
    }


def read_sidecar(weights: Path) -> dict | None:
    """The sidecar of ``weights`` (None if there is none), checked to belong to these very weights."""
    path = sidecar_path(weights)
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise WeightsError(f"{path}: unreadable sidecar ({err}); delete it to evaluate the weights alone") from None
    if not isinstance(body, dict) or "class_names" not in body or "config" not in body:
        raise WeightsError(f"{path}: not a vggft sidecar (no class_names/config); move it away or delete it")
    fmt = body.get("format")
    if fmt not in READABLE_WEIGHTS:
        raise WeightsError(
            f"{path}: sidecar format '{fmt}' is newer than this vggft {__version__} reads "
            f"({', '.join(READABLE_WEIGHTS)}); upgrade vggft"
        )
    expected = body.get("weights_sha256")
    if expected and file_digest(weights) != expected:
        raise WeightsError(
            f"{path}: belongs to other weights than '{weights}' (their SHA-256 differs: the files come from "
            "different runs, or a save was cut short); train again, or delete the sidecar to use the weights alone"
        )
    body["config"] = migrate_config(body["config"])
    if fmt == "vggft-weights/1":
        body["split"] = _legacy_split(weights, body.get("split_manifest"))
    return body


def _rebuild_light(body: dict, weights: Path) -> nn.Module:
    """The whole network of weights saved with output.full_weights: false; what is missing, in one line."""
    try:
        return rebuild_from_checkpoint(body, weights, "--weights")
    except WeightsError as err:
        raise WeightsError(
            f"--weights: '{weights}' holds the trained layers only (output.full_weights: false), the rest comes "
            f"from model.weights '{body.get('base_weights')}': {err}"
        ) from None


def _legacy_split(weights: Path, manifest: str | None) -> dict | None:
    """Format 1 kept a pool's split in a file beside the weights."""
    if not manifest:
        return None
    path = Path(weights).parent / manifest
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise WeightsError(f"{path}: unreadable split manifest ({err}); delete it to split the pool afresh") from None


@dataclass
class SavedWeights:
    """A full state_dict with what vggft recorded about it (``sidecar`` None for a bare state_dict)."""

    state_dict: dict[str, torch.Tensor]
    sidecar: dict | None
    path: Path

    @property
    def split(self) -> dict | None:
        return self.sidecar.get("split") if self.sidecar else None


def read_weights(weights: Path) -> SavedWeights:
    """A weights file with its sidecar, or a run's last.pt/best.pt rebuilt into full weights."""
    weights = Path(weights)
    check_weights_file(weights, "--weights", "pass the .pt file that vggft train saved")
    state_dict = read_state_dict(weights, "--weights")
    if "format" in state_dict:  # read_state_dict returns a run checkpoint whole
        body = checked_checkpoint(state_dict, weights, "--weights")
        if body.get("kind") == LIGHT_KIND:
            return SavedWeights(plain_state_dict(_rebuild_light(body, weights)), read_sidecar(weights), weights)
        model = rebuild_from_checkpoint(body, weights, "--weights")
        sidecar = {"class_names": body["class_names"], "config": body["config"], "split": body.get("split")}
        return SavedWeights(plain_state_dict(model), sidecar, weights)
    return SavedWeights(state_dict, read_sidecar(weights), weights)
