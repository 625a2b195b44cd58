"""Reading torch files without trusting them: every ``torch.load`` is ``weights_only=True``, and a refusal
is explained from the file's own pickle opcodes (a whole pickled model, or code), not from torch's message
text, which changes between versions."""

from __future__ import annotations

import argparse
import pickletools
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vggft.utils.errors import WeightsError, first_line
from vggft.utils.logs import log

STATE_DICT_FIX = "load only plain state_dict files (torch.save(model.state_dict(), ...))"


def _pickle_globals(path: Path) -> list[str] | None:
    """'module.name' of every global the pickle inside a torch.save zip names (None: not a zip we can read)."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
            if name is None:
                return None
            data = archive.read(name)
    except (OSError, zipfile.BadZipFile, ValueError):
        return None
    found, strings = [], []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(arg)
            elif opcode.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # a damaged pickle: say what torch says
        return None
    return found


def _is_safe_global(name: str) -> bool:
    """Globals a plain state_dict or a vggft checkpoint may name: tensor rebuilding and plain containers."""
    if name.startswith("torch.nn.modules."):  # a pickled module: a whole model, not its state
        return False
    return name.startswith(("torch.", "collections.OrderedDict", "_codecs.encode")) or name in (
        "builtins.set",
        "builtins.frozenset",
        "builtins.bytearray",
        "builtins.slice",
        "builtins.complex",
        "argparse.Namespace",
    )


WEIGHT_SUFFIXES = (".pt", ".pth")
LISTED = 5  # weights files a refusal names from a folder


def check_weights_file(path: Path, what: str, fix: str) -> None:
    """``path`` is a regular file; else a WeightsError naming ``what``: not found, or a folder (with the
    weights files inside it, so the fix is one copy away), or not a regular file (a FIFO, a device)."""
    if path.is_file():
        return
    if path.is_dir():
        try:
            inside = sorted(p.name for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
        except OSError:
            inside = []
        listed = ", ".join(inside[:LISTED]) + (f" and {len(inside) - LISTED} more" if len(inside) > LISTED else "")
        found = f"the weights files in it: {listed}" if inside else "it holds no .pt or .pth file"
        raise WeightsError(f"{what}: '{path}' is a folder, not a file ({found}); {fix}")
    problem = "is not a regular file" if path.exists() else "not found"
    raise WeightsError(f"{what}: '{path}' {problem}; {fix}")


# Beyond tensors and containers, what other tools' checkpoints hold that is safe to rebuild: the argparse
# options torchvision's reference scripts save beside the model ("args"), a plain attribute bag.
SAFE_CLASSES: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [argparse.Namespace]


def safe_load(path: Path, what: str, fix: str, *, mmap: bool = False):
    """``torch.load(weights_only=True)``; a pickle that would run code, or an unreadable file, is a WeightsError."""
    try:
        with torch.serialization.safe_globals(SAFE_CLASSES):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as err:
                if not mmap or "mmap" not in str(err):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)  # the legacy (non-zip) format
    except Exception as err:
        raise WeightsError(f"{what}: '{path}' {_refusal(path, err)}; {fix}") from None


def _refusal(path: Path, err: Exception) -> str:
    """Why a file was not loaded, judged from the file itself where it is a torch.save zip."""
    names = _pickle_globals(path)
    foreign = [n for n in names or [] if not _is_safe_global(n)]
    modules = [n for n in foreign if n.startswith(("torchvision.models.", "torch.nn.modules."))]
    if modules:
        model_class = modules[0]
        return (
            f"is a whole pickled model ({model_class}, saved with torch.save(model, ...)), which vggft does "
            "not unpickle because unpickling can run code; if you trust the file, turn it into a state_dict "
            "with: import torch; m = torch.load('FILE', weights_only=False); "
            "torch.save(m.state_dict(), 'FILE.state_dict.pt')"
        )
    if foreign:
        return f"contains pickled code or objects ({', '.join(sorted(set(foreign))[:3])}), which vggft never unpickles"
    if names is not None:
        return f"could not be read as a torch.save file ({first_line(err)})"
    return "is not a file written by torch.save"


# Where other tools keep the model's state_dict in their training checkpoints: torchvision's reference
# scripts ("model"), timm and PyTorch Lightning ("state_dict"), the PyTorch tutorials ("model_state_dict").
WRAPPER_KEYS = ("model_state_dict", "state_dict", "model", "net")
VGG_PARTS = ("features.", "classifier.")


def _is_state_dict(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def _vgg_prefix(keys: list[str]) -> str:
    """What every key carries before VGG's own names ('model.' from Lightning, 'module.' from DDP), or ''."""
    first = keys[0]
    for part in VGG_PARTS:
        at = first.find(part)
        if at == 0 or (at > 0 and first[at - 1] == "."):
            prefix = first[:at]
            if all(key.startswith(prefix) for key in keys):
                return prefix
    return ""


def unwrap(loaded: dict) -> tuple[str, str, dict] | None:
    """(key, prefix, state_dict) of a state_dict inside another tool's checkpoint, its names' common prefix
    removed; None when ``loaded`` holds none under ``WRAPPER_KEYS``."""
    for key in WRAPPER_KEYS:
        inner = loaded.get(key)
        if isinstance(inner, dict) and _is_state_dict(inner):
            prefix = _vgg_prefix(list(inner))
            return key, prefix, {name[len(prefix) :]: tensor for name, tensor in inner.items()}
    return None


def read_state_dict(path: Path, what: str, *, wrapped: bool = False) -> dict:
    """A plain state_dict, or a vggft run checkpoint (returned whole), read without unpickling code. With
    ``wrapped``, a state_dict inside another tool's checkpoint too (see ``unwrap``); the key is noted."""
    loaded = safe_load(path, what, STATE_DICT_FIX, mmap=True)
    if isinstance(loaded, dict) and str(loaded.get("format", "")).startswith("vggft-checkpoint"):
        return loaded
    if _is_state_dict(loaded):
        return loaded
    found = unwrap(loaded) if isinstance(loaded, dict) else None
    if found is None:
        keys = f" (its keys: {', '.join(map(str, list(loaded)[:6]))})" if isinstance(loaded, dict) and loaded else ""
        raise WeightsError(
            f"{what}: '{path}' is not a state_dict (a mapping of names to tensors){keys}; "
            f"save one with torch.save(model.state_dict(), ...)"
        )
    key, prefix, state_dict = found
    if not wrapped:
        raise WeightsError(
            f"{what}: '{path}' is a training checkpoint with its state_dict under '{key}'; to fine-tune from "
            f"it set model.weights to it (vggft reads that key), or save the state_dict alone: "
            f"torch.save(torch.load('{path}')['{key}'], 'weights.pth')"
        )
    stripped = f", names without their '{prefix}' prefix" if prefix else ""
    log.info(f"{what}: '{path}' is a training checkpoint; using its state_dict under '{key}'{stripped}")
    return state_dict
