"""The backbone's starting weights (``model.weights``): a torchvision name, read through torchvision's own
loader from the hub folder ($TORCH_HOME/hub/checkpoints/), or a local state_dict file."""

from __future__ import annotations

import contextlib
import mmap
import os
import sys
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import torch
from torchvision import models

from vggft.config.schema import ModelConfig, weights_is_file
from vggft.model.safe_load import check_weights_file, read_state_dict
from vggft.utils.errors import VggftError, WeightsError, first_line
from vggft.utils.logs import progress_enabled


def pretrained_state_dict(cfg: ModelConfig) -> dict[str, torch.Tensor] | None:
    """The backbone's starting weights from ``model.weights``: a torchvision name, a file, or None."""
    if cfg.weights is None:
        return None
    path = Path(cfg.weights).expanduser()
    if weights_is_file(cfg.weights):
        check_weights_file(
            path,
            "model.weights",
            "point it at a local .pth state_dict, use a torchvision name such as IMAGENET1K_V1, "
            "or null for random init",
        )
        state_dict = read_state_dict(path, "model.weights", wrapped=True)
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


def hub_file(url: str) -> Path:
    """Where torchvision keeps (and first looks for) the file of weights ``url``: $TORCH_HOME/hub/checkpoints/."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def pretrained_file(cfg: ModelConfig) -> Path | None:
    """The file ``model.weights`` is read from (a local file, or a torchvision name's file in the hub
    folder); None for random init, or a name torchvision does not know."""
    if cfg.weights is None:
        return None
    path = Path(cfg.weights).expanduser()
    if path.is_file():
        return path
    try:
        url = torchvision_weights(cfg.arch, cfg.weights).url
    except VggftError:
        return None
    return hub_file(url)


def _torchvision_state_dict(arch: str, name: str) -> dict[str, torch.Tensor]:
    weights = torchvision_weights(arch, name)
    cached = hub_file(weights.url)
    try:
        # torchvision's own loader: it looks in $TORCH_HOME/hub/checkpoints/ first, then downloads. Its tqdm
        # bar only where vggft's progress goes (not under --quiet; in a terminal, not frames in a log file).
        bar = progress_enabled() and sys.stderr.isatty()
        # torch.hub says 'Downloading: ...' on stdout, which is kept for a command's result: a note, on stderr.
        with _mapped_loads(cached), contextlib.redirect_stdout(sys.stderr):
            return weights.get_state_dict(progress=bar, check_hash=True, weights_only=True)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
        reason = getattr(err, "reason", err)
        raise WeightsError(
            f"model.weights: {arch} {weights.name} is not at {cached} ({_torch_home()}) and could not be "
            f"downloaded ({reason}); copy the file there or set TORCH_HOME to the folder whose hub/checkpoints/ "
            "holds it, set model.weights to a local .pth file, or use model.weights: null"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise WeightsError(
            f"{cached}: unreadable pretrained weights ({first_line(err)}); delete it to download again, "
            "or set model.weights to another file"
        ) from None


def _torch_home() -> str:
    """Where torchvision's hub folder comes from, for a message: TORCH_HOME, or its default."""
    home = os.environ.get("TORCH_HOME")
    return f"TORCH_HOME is {home}" if home else "TORCH_HOME is not set, so torch looks under ~/.cache/torch"


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
        mappable = False
    else:
        mappable = _zip_format(cached)
    if not mappable:
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
