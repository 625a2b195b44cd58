"""The files vggft reads and writes about models: safe loading, pretrained weights, trained weights with
their sidecar, run checkpoints, and the format versions that keep old files loadable.

- Nothing is ever unpickled beyond tensors: every ``torch.load`` is ``weights_only=True``, and a refusal
  is explained from the file's own pickle opcodes (a whole pickled model, or code), not from torch's
  message text, which changes between versions.
- Weights and sidecar are one unit: the weights are written first, then the sidecar, which records the
  weights' SHA-256; loading checks it, so a crash between the two renames is caught, never mislabelled.
- A run checkpoint (``last.pt``/``best.pt``) holds the trainable part only and the fingerprint of the
  frozen rest, which is rebuilt from ``model.weights`` and must match.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import pickletools
import sys
import time
import urllib.error
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision import models

from vggft import __version__
from vggft.config.schema import Config, ModelConfig, config_from_dict, migrate_config, weights_is_file
from vggft.utils.errors import OutputError, WeightsError, first_line
from vggft.utils.files import check_name_length, existing_parent, file_digest, save_json, save_torch
from vggft.utils.logs import progress_enabled
from vggft.model.build import build_model, frozen_prefix_layers

WEIGHTS_FORMAT = "vggft-weights/2"
CHECKPOINT_FORMAT = "vggft-checkpoint/2"
# Formats this version reads: 1 (vggft 0.1: no digest, split in a separate manifest file) and 2.
READABLE_WEIGHTS = ("vggft-weights/1", WEIGHTS_FORMAT)
READABLE_CHECKPOINTS = ("vggft-checkpoint/1", CHECKPOINT_FORMAT)
STATE_DICT_FIX = "load only plain state_dict files (torch.save(model.state_dict(), ...))"


# --- reading torch files safely ------------------------------------------------------------------

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
        "builtins.set", "builtins.frozenset", "builtins.bytearray", "builtins.slice", "builtins.complex")


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
        return (f"is a whole pickled model ({model_class}, saved with torch.save(model, ...)), which vggft does "
                "not unpickle because unpickling can run code; if you trust the file, turn it into a state_dict "
                "with: import torch; m = torch.load('FILE', weights_only=False); "
                "torch.save(m.state_dict(), 'FILE.state_dict.pt')")
    if foreign:
        return (f"contains pickled code or objects ({', '.join(sorted(set(foreign))[:3])}), "
                "which vggft never unpickles")
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


# --- pretrained weights (model.weights) ----------------------------------------------------------

def pretrained_state_dict(cfg: ModelConfig) -> dict[str, torch.Tensor] | None:
    """The backbone's starting weights from ``model.weights``: a torchvision name, a file, or None."""
    if cfg.weights is None:
        return None
    path = Path(cfg.weights).expanduser()
    if weights_is_file(cfg.weights):
        if not path.is_file():
            raise WeightsError(
                f"model.weights: file '{path}' not found; point it at a local .pth state_dict, "
                "use a torchvision name such as IMAGENET1K_V1, or null for random init"
            )
        state_dict = read_state_dict(path, "model.weights")
        if "format" in state_dict:
            raise WeightsError(
                f"model.weights: '{path}' is a run checkpoint (last.pt/best.pt), not a state_dict; continue that "
                f"run with vggft train --resume {path}, or start from the weights it saved (output.weights)"
            )
        return state_dict
    return _torchvision_state_dict(cfg.arch, cfg.weights)


def torchvision_weights(arch: str, name: str):
    """The torchvision weights enum member named ``name`` (IMAGENET1K_V1, DEFAULT) for ``arch``."""
    enum = models.get_model_weights(arch)
    try:
        return enum[name.split(".")[-1]]
    except KeyError:
        names = ", ".join(w.name for w in enum) + ", DEFAULT"
        raise WeightsError(
            f"model.weights: '{name}' is not a torchvision weights name for {arch} (one of {names}), "
            "nor an existing .pth file"
        ) from None


def _torchvision_state_dict(arch: str, name: str) -> dict[str, torch.Tensor]:
    weights = torchvision_weights(arch, name)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    try:
        # torchvision's own loader: it looks in $TORCH_HOME/hub/checkpoints/ first, then downloads. Its tqdm
        # bar only where vggft's progress goes (not under --quiet; in a terminal, not frames in a log file).
        bar = progress_enabled() and sys.stderr.isatty()
        with _mapped_loads(cached):
            return weights.get_state_dict(progress=bar, check_hash=True, weights_only=True)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
        reason = getattr(err, "reason", err)
        raise WeightsError(
            f"model.weights: {arch} {weights.name} is not at {cached} and could not be downloaded ({reason}); "
            "copy the file there, set model.weights to a local .pth file, or use model.weights: null"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise WeightsError(
            f"{cached}: unreadable pretrained weights ({first_line(err)}); delete it to download again, "
            "or set model.weights to another file"
        ) from None


@contextlib.contextmanager
def _mapped_loads(cached: Path) -> Iterator[None]:
    """torch.load maps ``cached`` instead of reading it, when it is in torch.save's zip format (the legacy
    format cannot be mapped): the tensors are pages of the file, read when touched (0.2 s saved per run on
    the 528 MB vgg16 file), and ``build_model`` assigns them to the frozen layers without a copy. The
    mapping is private (MAP_PRIVATE, whatever the process's default): a layer that trains changes its own
    copy of a page, never the file. The file must not be rewritten in place while a run holds it (torchvision
    writes it by rename)."""
    try:
        from torch.utils.serialization import config
    except ImportError:  # before torch 2.5: read as before
        config = None
    if config is None or not _zip_format(cached):
        yield
        return
    before = config.load.mmap, config.load.mmap_flags
    config.load.mmap, config.load.mmap_flags = True, getattr(mmap, "MAP_PRIVATE", before[1])  # Windows: no flags
    try:
        yield
    finally:
        config.load.mmap, config.load.mmap_flags = before


def _zip_format(path: Path) -> bool:
    """torch.save's zip format, tested as torch.load tests it (the local file header at the start)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """A content hash of named tensors (names, shapes, dtypes and bytes)."""
    digest = hashlib.sha1()
    for name, tensor in tensors.items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


# Frozen fingerprints made of the prefix's and the rest's start with this; older ones (vggft-checkpoint/2
# files written before it) are one hash over every frozen tensor, and are still checked as such.
FROZEN_SCHEME = "2:"


def frozen_fingerprint(model: nn.Module, trainable: dict[str, torch.Tensor], prefix_weights: str | None = None) -> str:
    """The fingerprint of everything a checkpoint does not hold: what is rebuilt from model.weights.

    It joins the ``fingerprint`` of the frozen prefix's state_dict (``prefix_weights``: the feature cache
    hashes the same tensors to name its folder, so a run hashes them once) and that of the frozen tensors
    after it; a tensor of the prefix that a two-stage run trains later is in the prefix's part.
    """
    layers = frozen_prefix_layers(model)
    if prefix_weights is None:
        prefix_weights = fingerprint(nn.Sequential(*[m for _, m in layers]).state_dict())
    inside = {f"{name}.{key}" for name, module in layers for key in module.state_dict()}
    rest = fingerprint({k: v for k, v in model.state_dict().items() if k not in trainable and k not in inside})
    return FROZEN_SCHEME + hashlib.sha1(f"{prefix_weights}|{rest}".encode()).hexdigest()


def legacy_frozen_fingerprint(model: nn.Module, trainable: dict[str, torch.Tensor]) -> str:
    """A frozen fingerprint as recorded before ``FROZEN_SCHEME``: one hash over every frozen tensor."""
    return fingerprint({k: v for k, v in model.state_dict().items() if k not in trainable})


# --- trained weights and their sidecar -------------------------------------------------------------

def sidecar_path(weights: Path) -> Path:
    return Path(weights).with_suffix(".json")


def check_writable(path: Path) -> None:
    """Fail before any work if the output cannot be written (creating nothing yet)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"output.weights: '{path}' is a folder; give a file path such as models/VGG16.pt")
    if path.suffix.lower() == ".json":
        raise OutputError(f"output.weights: '{path}' ends in .json, the name of its own sidecar; "
                          "give the weights a .pt name such as models/VGG16.pt")
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


def save_trained(model: nn.Module, weights: Path, cfg: Config, class_names: list[str], *,
                 metrics: dict | None = None, split: dict | None = None, temperature: float | None = None) -> Path:
    """Write the weights, then the sidecar that records their digest (and a pool's ``split``, and the softmax
    ``temperature`` fitted on val, if any), each atomically.

    A kill between the two renames leaves new weights beside the old sidecar: its digest no longer
    matches, and loading says so instead of naming the classes wrongly.
    """
    from vggft.data.transforms import preprocessing

    weights = Path(weights)
    digest = save_torch(plain_state_dict(model), weights, sha256=True)
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
        raise WeightsError(f"{path}: sidecar format '{fmt}' is newer than this vggft {__version__} reads "
                           f"({', '.join(READABLE_WEIGHTS)}); upgrade vggft")
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
    if not weights.is_file():
        raise WeightsError(f"--weights: '{weights}' not found; pass the .pt file that vggft train saved")
    state_dict = read_state_dict(weights, "--weights")
    if "format" in state_dict:  # read_state_dict returns a run checkpoint whole
        body = checked_checkpoint(state_dict, weights, "--weights")
        model = rebuild_from_checkpoint(body, weights, "--weights")
        sidecar = {"class_names": body["class_names"], "config": body["config"], "split": body.get("split")}
        return SavedWeights(plain_state_dict(model), sidecar, weights)
    return SavedWeights(state_dict, read_sidecar(weights), weights)


# --- run checkpoints (last.pt, best.pt) ------------------------------------------------------------

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


def save_checkpoint(path: Path, body: dict) -> None:
    """``body`` (epoch, model, optimizer, ... as ``vggft.train`` builds it) under the current format."""
    save_torch({"format": CHECKPOINT_FORMAT, "vggft_version": __version__, **body}, path)


def load_checkpoint(path: Path, what: str = "--resume") -> dict:
    """A training checkpoint, read with weights_only=True (a pickle that would run code is refused)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{what}: '{path}' not found; pass runs/<name>/last.pt of an earlier run")
    return checked_checkpoint(safe_load(path, what, "pass a last.pt written by vggft train"), path, what)


def checked_checkpoint(body, path: Path, what: str) -> dict:
    if not isinstance(body, dict) or not str(body.get("format", "")).startswith("vggft-checkpoint/"):
        raise WeightsError(f"{what}: '{path}' is not a vggft training checkpoint (last.pt/best.pt of a run)")
    if body["format"] not in READABLE_CHECKPOINTS:
        raise WeightsError(f"{what}: '{path}' has checkpoint format '{body['format']}', newer than this "
                           f"vggft {__version__} reads; upgrade vggft")
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
        raise WeightsError(f"{what}: '{path}' was trained on other base weights than model.weights '{weights}' "
                           f"gives now (the file changed since); restore those weights, or {fix}")


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
        raise WeightsError(f"{what}: '{path}' does not fit {cfg.model.arch} with a {cfg.model.head} head "
                           f"(unexpected: {', '.join(unexpected[:3]) or 'none'})")
    return model
