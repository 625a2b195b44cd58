"""A narrow stand-in for torchvision's VGG: the same class, layer layout and state_dict names (13 convs in
five blocks for vgg16, ``features[29]`` the last ReLU, ``classifier[6]`` the last Linear), about 20k
parameters instead of 138M. The tests put it behind ``vggft.model.build.vgg`` so the real freeze, swap, cache and
save code runs on it; a few tests marked ``real_vgg`` use torchvision's full network instead.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.vgg import VGG, cfgs, make_layers

LETTER = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}
WIDTH = {64: 4, 128: 8, 256: 8, 512: 16}  # channels of each block, narrowed


def tiny_vgg(
    arch: str = "vgg16", *, num_classes: int = 1000, dropout: float = 0.5, init_weights: bool = True, **_
) -> VGG:
    """``arch``'s layout with narrow layers (made in the same order as tests/fixtures/format1/make.py)."""
    cfg = [v if v == "M" else WIDTH[v] for v in cfgs[LETTER[arch.removesuffix("_bn")]]]
    model = VGG.__new__(VGG)
    nn.Module.__init__(model)
    model.features = make_layers(cfg, batch_norm=arch.endswith("_bn"))
    model.avgpool = nn.AdaptiveAvgPool2d((2, 2))
    model.classifier = nn.Sequential(
        nn.Linear(64, 32),
        nn.ReLU(True),
        nn.Dropout(dropout),
        nn.Linear(32, 32),
        nn.ReLU(True),
        nn.Dropout(dropout),
        nn.Linear(32, num_classes),
    )
    return model


def tutorial_model(num_classes: int, arch: str = "vgg16") -> VGG:
    """What the PyTorch tutorial saves: the network with classifier[6] swapped for ``num_classes`` outputs."""
    model = tiny_vgg(arch)
    model.classifier[6] = nn.Linear(model.classifier[6].in_features, num_classes)
    return model
