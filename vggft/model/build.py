"""Building the network: VGG backbone, pretrained weights, the new head, freezing.

The saved weights stay a plain torchvision ``VGG`` state_dict, so that
``m = vgg16(); m.classifier[6] = nn.Linear(4096, k); m.load_state_dict(...)`` loads them.
"""

from __future__ import annotations

from typing import Literal, cast

import torch
from torch import nn
from torchvision import models

from vggft.config.schema import ARCHS, Arch, ModelConfig
from vggft.utils.errors import ConfigError, WeightsError, first_line
from vggft.utils.logs import log

IMAGENET_CLASSES = 1000
CONV_COUNT = {"vgg11": 8, "vgg13": 10, "vgg16": 13, "vgg19": 16}
Head = Literal["classifier6", "gap"]  # model.head


def vgg(arch: str, *, num_classes: int = 1000, dropout: float = 0.5, init_weights: bool = True) -> models.VGG:
    """The one place a network is made: torchvision's ``VGG`` for ``arch``, without weights.

    (The tests replace this factory with a narrow stand-in of the same layout.)
    """
    return models.get_model(arch, weights=None, num_classes=num_classes, init_weights=init_weights, dropout=dropout)


def _skeleton(arch: str, num_classes: int = 1000, dropout: float = 0.5) -> models.VGG:
    """The architecture on the meta device: no memory, no random init; load weights with assign=True."""
    with torch.device("meta"):
        return vgg(arch, num_classes=num_classes, init_weights=False, dropout=dropout)


def _what_it_is(state_dict: dict[str, torch.Tensor], err: RuntimeError, expected: str) -> str:
    """'they are vgg11 weights', or the first mismatch torch reports."""
    try:
        arch, _, _ = describe_state_dict(state_dict)
    except WeightsError:
        arch = None
    if arch is not None and arch != expected:
        return f"they are {arch} weights"
    detail = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
    return detail[0].rstrip(".") if detail else first_line(err)


def replace_head(model: models.VGG, head: str, num_classes: int) -> None:
    """Swap in the new trainable head: ``classifier[6]``, or the Keras recipe's GAP head."""
    if head == "classifier6":
        model.classifier[6] = nn.Linear(model.classifier[6].in_features, num_classes)
    else:
        # features -> global average pool -> Linear(512, 512) -> ReLU -> Linear(512, n);
        # VGG.forward flattens between avgpool and classifier.
        width = feature_width(model)  # 512 for every torchvision VGG
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        model.classifier = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, num_classes))


def feature_width(model: models.VGG) -> int:
    """Channels of the last conv layer: the length of the pooled feature vector."""
    return [m for m in model.features if isinstance(m, nn.Conv2d)][-1].out_channels


def build_model(cfg: ModelConfig, num_classes: int, state_dict: dict | None) -> models.VGG:
    """VGG with the backbone weights ``state_dict`` (``vggft.model.pretrained.pretrained_state_dict``; None for
    random init), a fresh head for ``num_classes`` and frozen layers.

    Random parts (the head; the whole net with weights null) use torch's global RNG: seed first.
    """
    if state_dict is None:
        model = vgg(cfg.arch, dropout=cfg.dropout)
    else:
        source = cfg.weights
        classes = state_dict.get("classifier.6.weight")
        model = _skeleton(cfg.arch, classes.shape[0] if classes is not None else 1000, cfg.dropout)
        backbone_only = "classifier.6.weight" not in state_dict
        try:
            model.load_state_dict(state_dict, assign=True, strict=not backbone_only)
        except RuntimeError as err:
            raise WeightsError(
                f"model.weights: '{source}' does not fit {cfg.arch} ({_what_it_is(state_dict, err, cfg.arch)}); "
                "set model.arch to the architecture the weights were saved from"
            ) from None
        if backbone_only and any(p.is_meta for p in model.features.parameters()):
            raise WeightsError(f"model.weights: '{source}' holds no {cfg.arch} backbone weights")
        _note_head_in_file(state_dict, cfg, num_classes)
    replace_head(model, cfg.head, num_classes)
    _materialize(model)
    freeze(model, cfg)
    return model


def _note_head_in_file(state_dict: dict, cfg: ModelConfig, num_classes: int) -> None:
    """Say what happens to a head the weights file brings (a 1000-class ImageNet head is replaced as the
    recipe says, without a word), and when classifier6's frozen layers have no weights to start from."""
    head = state_dict.get("classifier.6.weight")
    if head is not None and head.shape[0] != IMAGENET_CLASSES:
        log.info(
            f"model.weights: '{cfg.weights}' has a trained {head.shape[0]}-class head; a new {num_classes}-class "
            "head replaces it (to use that head as it is: vggft eval or predict --weights with the file)"
        )
    elif cfg.head == "classifier6" and "classifier.0.weight" not in state_dict:
        log.warning(
            f"model.weights: '{cfg.weights}' holds no classifier weights, so classifier.0 and classifier.3 start "
            "random and stay frozen under model.head: classifier6; set model.head: gap to train on the backbone's "
            "pooled features instead"
        )


def _materialize(model: nn.Module) -> None:
    """Give any parameter still on the meta device real, initialised memory (heads not in the file)."""
    for module in model.modules():
        if any(p.is_meta for p in module.parameters(recurse=False)):
            module.to_empty(device="cpu", recurse=False)
            reset = getattr(module, "reset_parameters", None)
            if reset is not None:
                reset()


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


def describe_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[Arch, Head, int]:
    """(arch, head, num_classes) of a saved VGG state_dict, for files that come without a sidecar."""
    convs = [k for k, v in state_dict.items() if k.startswith("features.") and k.endswith(".weight") and v.dim() == 4]
    by_count = {n: a for a, n in CONV_COUNT.items()}
    if len(convs) not in by_count:
        raise WeightsError(f"found {len(convs)} conv layers, which is no VGG (11, 13, 16 or 19 have 8, 10, 13, 16)")
    bn = "_bn" if any(k.endswith("running_mean") for k in state_dict) else ""
    arch = cast(Arch, by_count[len(convs)] + bn)  # one of ARCHS: the assert at the end of this module
    if "classifier.6.weight" in state_dict:
        return arch, "classifier6", int(state_dict["classifier.6.weight"].shape[0])
    last = state_dict.get("classifier.2.weight")
    first = state_dict.get("classifier.0.weight")
    if last is not None and first is not None and first.shape[1] == state_dict[convs[-1]].shape[0]:
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
    cut = len(frozen_prefix_layers(model))
    prefix = nn.Sequential(*[m for _, m in layers[:cut]])
    suffix = nn.Sequential(*[m for _, m in layers[cut:]])
    return prefix.eval(), suffix, layers[cut - 1][0] if cut else "input"


def frozen_prefix_layers(model: models.VGG) -> list[tuple[str, nn.Module]]:
    """The named layers of ``split_frozen_prefix``'s prefix (the model is left as it is)."""
    layers = layer_sequence(model)
    cut = 0
    while cut < len(layers) and _deterministic_frozen(layers[cut][1]):
        cut += 1
    return layers[:cut]


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
