"""Building the network: VGG backbone, pretrained weights, the new head, freezing.

The saved weights stay a plain torchvision ``VGG`` state_dict, so that
``m = vgg16(); m.classifier[6] = nn.Linear(4096, k); m.load_state_dict(...)`` loads them.
"""

from __future__ import annotations

import os
import urllib.error
import zipfile
from pathlib import Path

import torch
from torch import nn
from torchvision import models

from .config import ARCHS, ModelConfig
from .errors import WeightsError, first_line

CONV_COUNT = {"vgg11": 8, "vgg13": 10, "vgg16": 13, "vgg19": 16}


def _skeleton(arch: str, num_classes: int = 1000, dropout: float = 0.5) -> models.VGG:
    """The architecture on the meta device: no memory, no random init; load weights with assign=True."""
    with torch.device("meta"):
        return models.get_model(arch, weights=None, num_classes=num_classes, init_weights=False, dropout=dropout)


def pretrained_state_dict(cfg: ModelConfig) -> dict[str, torch.Tensor] | None:
    """The backbone's starting weights from ``model.weights``: a torchvision name, a file, or None."""
    if cfg.weights is None:
        return None
    path = Path(cfg.weights).expanduser()
    if path.suffix in (".pth", ".pt", ".bin") or os.sep in cfg.weights or path.exists():
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


def _torchvision_state_dict(arch: str, name: str) -> dict[str, torch.Tensor]:
    enum = models.get_model_weights(arch)
    try:
        weights = enum[name.split(".")[-1]]
    except KeyError:
        names = ", ".join(w.name for w in enum) + ", DEFAULT"
        raise WeightsError(
            f"model.weights: '{name}' is not a torchvision weights name for {arch} (one of {names})"
        ) from None
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    cached = hub / os.path.basename(weights.url)
    try:
        # torchvision's own loader: it looks in $TORCH_HOME/hub/checkpoints/ first, then downloads.
        return weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
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
        text = first_line(err)
        if "weights_only" in text or "Unsupported global" in text or "GLOBAL" in text:
            raise WeightsError(
                f"{what}: '{path}' contains pickled code or objects, which vggft never unpickles; {fix}"
            ) from None
        detail = f" ({text})" if zipfile.is_zipfile(path) else ""  # for any other bytes torch's reason is noise
        raise WeightsError(f"{what}: '{path}' is not a file written by torch.save{detail}; {fix}") from None


def read_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A plain state_dict (or a vggft run checkpoint), read without unpickling code."""
    loaded = safe_load(path, what, "load only plain state_dict files (torch.save(model.state_dict(), ...))", mmap=True)
    if isinstance(loaded, dict) and str(loaded.get("format", "")).startswith("vggft-checkpoint"):
        return loaded  # a run's last.pt / best.pt: vggft.checkpoint rebuilds the full model from it
    if not isinstance(loaded, dict) or not loaded or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise WeightsError(f"{what}: '{path}' is not a state_dict (a mapping of names to tensors)")
    return loaded


def _what_it_is(state_dict: dict[str, torch.Tensor], err: RuntimeError) -> str:
    """'they are vgg11 weights', or the first mismatch torch reports."""
    try:
        arch, _, _ = describe_state_dict(state_dict)
        return f"they are {arch} weights"
    except WeightsError:
        detail = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
        return detail[0].rstrip(".") if detail else first_line(err)


def replace_head(model: models.VGG, head: str, num_classes: int) -> None:
    """Swap in the new trainable head: ``classifier[6]``, or the Keras recipe's GAP head."""
    if head == "classifier6":
        model.classifier[6] = nn.Linear(model.classifier[6].in_features, num_classes)
    else:
        # features -> global average pool -> Linear(512, 512) -> ReLU -> Linear(512, n);
        # VGG.forward flattens between avgpool and classifier.
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        model.classifier = nn.Sequential(nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Linear(512, num_classes))


def build_model(cfg: ModelConfig, num_classes: int, state_dict: dict | None = None) -> models.VGG:
    """VGG with the configured backbone weights, a fresh head for ``num_classes`` and frozen layers.

    ``state_dict`` defaults to ``pretrained_state_dict(cfg)``; pass it to avoid loading twice.
    Random parts (the head; the whole net with weights null) use torch's global RNG: seed first.
    """
    if state_dict is None:
        state_dict = pretrained_state_dict(cfg)
    if state_dict is None:
        model = models.get_model(cfg.arch, weights=None, dropout=cfg.dropout)
    else:
        source = cfg.weights
        classes = state_dict.get("classifier.6.weight")
        model = _skeleton(cfg.arch, classes.shape[0] if classes is not None else 1000, cfg.dropout)
        backbone_only = "classifier.6.weight" not in state_dict
        try:
            model.load_state_dict(state_dict, assign=True, strict=not backbone_only)
        except RuntimeError as err:
            raise WeightsError(f"model.weights: '{source}' does not fit {cfg.arch} ({_what_it_is(state_dict, err)}); "
                               "set model.arch to the architecture the weights were saved from") from None
        if backbone_only and any(p.is_meta for p in model.features.parameters()):
            raise WeightsError(f"model.weights: '{source}' holds no {cfg.arch} backbone weights")
    replace_head(model, cfg.head, num_classes)
    _materialize(model)
    freeze(model, cfg)
    return model


def _materialize(model: nn.Module) -> None:
    """Give any parameter still on the meta device real, initialised memory (heads not in the file)."""
    for module in model.modules():
        if any(p.is_meta for p in module.parameters(recurse=False)):
            module.to_empty(device="cpu", recurse=False)
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()


def conv_blocks(model: models.VGG) -> list[list[nn.Module]]:
    """The VGG feature stack cut into its blocks (block1..block5), each ending in a MaxPool."""
    blocks: list[list[nn.Module]] = [[]]
    for layer in model.features:
        blocks[-1].append(layer)
        if isinstance(layer, nn.MaxPool2d):
            blocks.append([])
    return [b for b in blocks if b]


def freeze(model: models.VGG, cfg: ModelConfig) -> None:
    """Freeze everything, then make the head (and any ``model.unfreeze`` blocks) trainable."""
    for param in model.parameters():
        param.requires_grad = False
    head = [model.classifier[6]] if cfg.head == "classifier6" else [model.classifier]
    blocks = conv_blocks(model)
    for index in unfrozen_block_indices(cfg.unfreeze, len(blocks)):
        head.extend(blocks[index])
    for module in head:
        for param in module.parameters():
            param.requires_grad = True
    if not any(p.requires_grad for p in model.parameters()):
        raise AssertionError("freezing left nothing trainable")


def unfrozen_block_indices(unfreeze: list[str] | int, count: int) -> list[int]:
    from .errors import ConfigError

    if isinstance(unfreeze, int):
        if not 0 <= unfreeze <= count:
            raise ConfigError(f"model.unfreeze: expected a block count from 0 to {count}, got {unfreeze}")
        return list(range(count - unfreeze, count))
    indices = []
    for name in unfreeze:
        if not (name.startswith("block") and name[5:].isdigit() and 1 <= int(name[5:]) <= count):
            names = ", ".join(f"block{i}" for i in range(1, count + 1))
            raise ConfigError(f"model.unfreeze: unknown block '{name}'; expected some of {names}")
        indices.append(int(name[5:]) - 1)
    return sorted(set(indices))


def describe_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[str, str, int]:
    """(arch, head, num_classes) of a saved VGG state_dict, for files that come without a sidecar."""
    convs = [k for k, v in state_dict.items() if k.startswith("features.") and k.endswith(".weight") and v.dim() == 4]
    by_count = {n: a for a, n in CONV_COUNT.items()}
    if len(convs) not in by_count:
        raise WeightsError(f"found {len(convs)} conv layers, which is no VGG (11, 13, 16 or 19 have 8, 10, 13, 16)")
    arch = by_count[len(convs)] + ("_bn" if any(k.endswith("running_mean") for k in state_dict) else "")
    if "classifier.6.weight" in state_dict:
        return arch, "classifier6", int(state_dict["classifier.6.weight"].shape[0])
    last = state_dict.get("classifier.2.weight")
    if last is not None and state_dict["classifier.0.weight"].shape[1] == 512:
        return arch, "gap", int(last.shape[0])
    raise WeightsError("the classifier matches neither head (classifier6, gap)")


def model_from_weights(state_dict: dict[str, torch.Tensor], arch: str, head: str, num_classes: int) -> models.VGG:
    """A fine-tuned model exactly as saved (all frozen: for evaluation and prediction)."""
    model = _skeleton(arch)
    with torch.device("meta"):
        replace_head(model, head, num_classes)
    model.load_state_dict(state_dict, assign=True)
    for param in model.parameters():
        param.requires_grad = False
    return model.eval()


def layer_sequence(model: models.VGG) -> list[tuple[str, nn.Module]]:
    """The forward pass as a flat list of named layers: features, avgpool, flatten, classifier."""
    layers = [(f"features.{i}", m) for i, m in enumerate(model.features)]
    layers += [("avgpool", model.avgpool), ("flatten", nn.Flatten(1))]
    layers += [(f"classifier.{i}", m) for i, m in enumerate(model.classifier)]
    return layers


def _deterministic_frozen(module: nn.Module) -> bool:
    if any(p.requires_grad for p in module.parameters()):
        return False
    return not (isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0)


def split_frozen_prefix(model: models.VGG) -> tuple[nn.Sequential, nn.Sequential, str]:
    """(prefix, suffix, cut): ``prefix`` is the longest frozen, deterministic run of layers from the
    input (in eval mode), ``suffix`` the rest; ``suffix(prefix(x)) == model(x)``.

    For the classifier6 head the cut is after ``classifier.1`` (4096 features per image: the dropout,
    the frozen ``classifier[3]`` and the new ``classifier[6]`` keep their training semantics); for
    the gap head it is the pooled 512-vector.
    """
    layers = layer_sequence(model)
    cut = 0
    while cut < len(layers) and _deterministic_frozen(layers[cut][1]):
        cut += 1
    prefix = nn.Sequential(*[m for _, m in layers[:cut]])
    suffix = nn.Sequential(*[m for _, m in layers[cut:]])
    return prefix.eval(), suffix, layers[cut - 1][0] if cut else "input"


def set_train_mode(suffix: nn.Module) -> None:
    """Train mode for what learns; frozen BatchNorm keeps its running statistics (eval mode)."""
    suffix.train()
    for module in suffix.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in module.parameters()
        ):
            module.eval()


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


assert set(ARCHS) == {a + s for a in CONV_COUNT for s in ("", "_bn")}
