"""Reading torch files without trusting them: every ``torch.load`` is ``weights_only=True``, and a refusal
is explained from the file's own pickle opcodes (a whole pickled model, or code), not from torch's message
text, which changes between versions."""

from __future__ import annotations

import pickletools
import zipfile
from pathlib import Path

import torch

from vggft.utils.errors import WeightsError, first_line

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
    )


def safe_load(path: Path, what: str, fix: str, *, mmap: bool = False):
    """``torch.load(weights_only=True)``; a pickle that would run code, or an unreadable file, is a WeightsError."""
    try:
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


def read_state_dict(path: Path, what: str) -> dict:
    """A plain state_dict, or a vggft run checkpoint (returned whole), read without unpickling code."""
    loaded = safe_load(path, what, STATE_DICT_FIX, mmap=True)
    if isinstance(loaded, dict) and str(loaded.get("format", "")).startswith("vggft-checkpoint"):
        return loaded
    if not isinstance(loaded, dict) or not loaded or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise WeightsError(f"{what}: '{path}' is not a state_dict (a mapping of names to tensors)")
    return loaded
