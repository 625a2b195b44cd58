"""Saving and loading trained weights: a plain state_dict plus a JSON sidecar, written atomically."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from . import __version__, rng
from .config import Config
from .errors import OutputError, WeightsError
from .files import existing_parent, save_json, save_torch
from .model import read_state_dict, safe_load
from .transforms import normalization


def sidecar_path(weights: Path) -> Path:
    return Path(weights).with_suffix(".json")


def manifest_path(weights: Path) -> Path:
    return Path(weights).with_suffix(".split.json")


def check_writable(path: Path) -> None:
    """Fail before any work if the output cannot be written (creating nothing yet)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"output.weights: '{path}' is a folder; give a file path such as models/VGG16.pt")
    existing = existing_parent(path.parent)
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(
            f"output.weights: cannot write to '{path.parent}' ('{existing}' is not a writable folder); "
            "choose another path with --set output.weights=PATH"
        )


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors: loadable by plain torchvision code on any machine."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save_trained(model: nn.Module, weights: Path, cfg: Config, class_names: list[str], *,
                 metrics: dict | None = None, manifest: Path | None = None) -> Path:
    """Write the weights, then the sidecar; each atomically, so a crash leaves the old pair readable."""
    weights = Path(weights)
    mean, std = normalization(cfg.data)
    num_outputs = cfg.model.num_classes or len(class_names)
    save_torch(plain_state_dict(model), weights)
    sidecar = {
        "format": "vggft-weights/1",
        "vggft_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "weights_file": weights.name,
        "arch": cfg.model.arch,
        "head": cfg.model.head,
        "num_classes": num_outputs,
        "class_names": class_names,
        "image_size": cfg.data.image_size,
        "resize": cfg.data.resize,
        "normalize": cfg.data.normalize,
        "mean": list(mean),
        "std": list(std),
        "split_manifest": os.path.relpath(manifest, weights.parent) if manifest else None,
        "config": cfg.to_dict(),
        "metrics": metrics or {},
    }
    path = sidecar_path(weights)
    save_json(sidecar, path)
    return path


def read_sidecar(weights: Path) -> dict | None:
    path = sidecar_path(weights)
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise WeightsError(f"{path}: unreadable sidecar ({err}); delete it to evaluate the weights alone") from None
    if not isinstance(body, dict) or "class_names" not in body or "config" not in body:
        raise WeightsError(f"{path}: not a vggft sidecar (no class_names/config); move it away or delete it")
    return body


def load_trained(weights: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(full state_dict, sidecar or None) of a weights file, or of a run's last.pt/best.pt."""
    weights = Path(weights)
    if not weights.is_file():
        raise WeightsError(f"--weights: '{weights}' not found; pass the .pt file that vggft train saved")
    state_dict = read_state_dict(weights, "--weights")
    if "format" in state_dict:  # read_state_dict returns a run checkpoint whole
        return _checkpoint_weights(_checked(state_dict, weights, "--weights"))
    return state_dict, read_sidecar(weights)


def _checkpoint_weights(body: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """A run checkpoint holds what trained; the frozen rest comes from its model.weights again."""
    from .config import config_from_dict
    from .model import build_model

    cfg = config_from_dict(body["config"], "checkpoint config")
    rng.seed_everything(cfg.train.seed)  # the same draws as training: a random-init backbone comes back identical
    model = build_model(cfg.model, cfg.model.num_classes or len(body["class_names"]))
    model.load_state_dict(body["model"], strict=False)
    return plain_state_dict(model), {"class_names": body["class_names"], "config": body["config"]}


# --- training checkpoints (last.pt, best.pt) ----------------------------------------------------

CHECKPOINT_FORMAT = "vggft-checkpoint/1"


def trainable_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, torch.Tensor]:
    """What training can change: parameters that learn (those the optimizer holds, even if a two-stage run
    has not thawed them yet), and the buffers (BatchNorm statistics) beside them.

    The frozen rest is rebuilt from ``model.weights``, so a checkpoint of a head is kilobytes, not 500 MB.
    """
    held = {id(p) for group in optimizer.param_groups for p in group["params"]} if optimizer else set()
    learning = {name for name, p in model.named_parameters() if p.requires_grad or id(p) in held}
    owners = {name.rsplit(".", 1)[0] for name in learning}
    state = {}
    for name, tensor in model.state_dict().items():
        if name in learning or name.rsplit(".", 1)[0] in owners:
            state[name] = tensor.detach().to("cpu").contiguous()
    return state


def save_checkpoint(path: Path, *, model: nn.Module, optimizer, scheduler, epoch: int, cfg: Config,
                    class_names: list[str], history: list[dict], best: dict, generator: torch.Generator,
                    extra: dict | None = None) -> None:
    save_torch({
        "format": CHECKPOINT_FORMAT,
        "epoch": epoch,
        "model": trainable_state(model, optimizer),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "config": cfg.to_dict(),
        "class_names": class_names,
        "history": history,
        "best": best,
        "rng": rng.capture(generator),
        **(extra or {}),
    }, path)


def load_checkpoint(path: Path) -> dict:
    """A training checkpoint, read with weights_only=True (a pickle that would run code is refused)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"--resume: '{path}' not found; pass runs/<name>/last.pt of an earlier run")
    return _checked(safe_load(path, "--resume", "pass a last.pt written by vggft train"), path, "--resume")


def _checked(body, path: Path, what: str) -> dict:
    if not isinstance(body, dict) or body.get("format") != CHECKPOINT_FORMAT:
        raise WeightsError(f"{what}: '{path}' is not a vggft training checkpoint (last.pt/best.pt of a run)")
    return body
