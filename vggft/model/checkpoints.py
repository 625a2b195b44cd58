"""Run checkpoints (``last.pt``, ``best.pt``): the trainable part only and the fingerprint of the frozen rest,
which is rebuilt from ``model.weights`` and must match."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from vggft import __version__
from vggft.config.loading import config_from_dict, migrate_config
from vggft.model.build import build_model
from vggft.model.fingerprint import FROZEN_SCHEME, frozen_fingerprint, legacy_frozen_fingerprint
from vggft.model.pretrained import pretrained_state_dict
from vggft.model.safe_load import check_weights_file, safe_load
from vggft.utils.errors import WeightsError
from vggft.utils.files import save_torch

CHECKPOINT_FORMAT = "vggft-checkpoint/2"


READABLE_CHECKPOINTS = ("vggft-checkpoint/1", CHECKPOINT_FORMAT)


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


LIGHT_KIND = "weights"  # output.weights with output.full_weights: false: the trained tensors, the rest rebuilt


def save_checkpoint(path: Path, body: dict) -> None:
    """``body`` (epoch, model, optimizer, ... as ``training.train`` builds it) under the current format."""
    save_torch({"format": CHECKPOINT_FORMAT, "vggft_version": __version__, **body}, path)


def load_checkpoint(path: Path, what: str = "--resume") -> dict:
    """A training checkpoint, read with weights_only=True (a pickle that would run code is refused)."""
    path = Path(path)
    check_weights_file(path, what, "pass runs/<name>/last.pt of an earlier run")
    return checked_checkpoint(safe_load(path, what, "pass a last.pt written by vggft train"), path, what)


def checked_checkpoint(body, path: Path, what: str) -> dict:
    if not isinstance(body, dict) or not str(body.get("format", "")).startswith("vggft-checkpoint/"):
        raise WeightsError(f"{what}: '{path}' is not a vggft training checkpoint (last.pt/best.pt of a run)")
    if body["format"] not in READABLE_CHECKPOINTS:
        raise WeightsError(
            f"{what}: '{path}' has checkpoint format '{body['format']}', newer than this "
            f"vggft {__version__} reads; upgrade vggft"
        )
    body["config"] = migrate_config(body["config"])
    if body["format"] == "vggft-checkpoint/1":
        split = path.parent / "split.json"  # format 1 kept a pool run's split beside its checkpoints
        body["split"] = json.loads(split.read_text(encoding="utf-8")) if split.is_file() else None
        body.setdefault("best_model", None)
    return body


def check_frozen(model: nn.Module, body: dict, path: Path, what: str, fix: str, *, current: str | None = None) -> None:
    """Refuse checkpoint ``body`` if the frozen part of ``model`` (just rebuilt from its model.weights) is not the
    one it was trained on. ``current``: the model's ``frozen_fingerprint``, when already computed; ``fix``:
    what to do instead."""
    expected = body.get("frozen_fingerprint")
    if expected is None:  # format 1 recorded none
        return
    if str(expected).startswith(FROZEN_SCHEME):
        got = current or frozen_fingerprint(model, body["model"])
    else:  # recorded before FROZEN_SCHEME: that hash (one more pass over the frozen weights)
        got = legacy_frozen_fingerprint(model, body["model"])
    if got != expected:
        weights = body["config"]["model"].get("weights")
        raise WeightsError(
            f"{what}: '{path}' was trained on other base weights than model.weights '{weights}' "
            f"gives now (the file changed since); restore those weights, or {fix}"
        )


def rebuild_from_checkpoint(body: dict, path: Path, what: str) -> nn.Module:
    """The full model of a checkpoint: the frozen part rebuilt from its model.weights, checked against
    the fingerprint recorded at training time; the caller's random state is left as it was."""
    cfg = config_from_dict(body["config"], f"{path} (config)")
    num_outputs = cfg.model.num_classes or len(body["class_names"])
    state_dict = pretrained_state_dict(cfg.model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)  # the draws of training: a random-init backbone comes back identical
        model = build_model(cfg.model, num_outputs, state_dict)
    check_frozen(model, body, path, what, "use the weights the run saved (output.weights)")
    _, unexpected = model.load_state_dict(body["model"], strict=False)  # the frozen rest is already in place
    if unexpected:
        raise WeightsError(
            f"{what}: '{path}' does not fit {cfg.model.arch} with a {cfg.model.head} head "
            f"(unexpected: {', '.join(unexpected[:3]) or 'none'})"
        )
    return model
