"""A stand-in backbone whose pooled features describe a picture, for tests that need features to mean
something (near-duplicates, calibration, Grad-CAM of a learnt head).

The tiny stand-in VGG with random weights maps every picture to nearly the same direction (its pooled
features are dominated by the mean colour: unrelated pictures reach cosine 0.99), where a pretrained VGG
tells them apart. Here ``conv1_1`` computes four colour-opponent channels (red-green, green-red,
blue-yellow, yellow-blue) from the normalised input, and every later conv passes them through unchanged
(the ReLUs and max pools keep non-negative maps non-negative): the pooled 16-d feature is the picture's
colour-opponent signature, so pictures of other hues are far apart and a recompressed copy is close.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tiny import tiny_vgg
from vggft.data.transforms import IMAGENET_MEAN, IMAGENET_STD

# Each opponent channel as weights on (R, G, B) pixels in [0, 1].
OPPONENTS = ((1.0, -1.0, 0.0), (-1.0, 1.0, 0.0), (-0.5, -0.5, 1.0), (0.5, 0.5, -1.0))


def descriptor_state_dict(arch: str = "vgg16") -> dict[str, torch.Tensor]:
    """The ``features.*`` weights of the tiny ``arch`` (no classifier: vggft adds a fresh head)."""
    model = tiny_vgg(arch)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    with torch.no_grad():
        for conv in convs:
            conv.weight.zero_()
            conv.bias.zero_()
        first = convs[0]
        for channel, pixel_weights in enumerate(OPPONENTS):
            w = torch.tensor(pixel_weights)
            first.weight[channel, :, 1, 1] = w * std  # (p - mean) / std in, sum of w * p out
            first.bias[channel] = float((w * mean).sum())
        for conv in convs[1:]:
            for channel in range(len(OPPONENTS)):
                conv.weight[channel, channel, 1, 1] = 1.0
    return {k: v for k, v in model.state_dict().items() if k.startswith("features.")}


def save_descriptor(path: Path, arch: str = "vgg16") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(descriptor_state_dict(arch), path)
    return path


def scene(path: Path, hue: float, seed: int = 0, size: tuple[int, int] = (96, 80)) -> Path:
    """A picture of one hue: a background and a few shapes of nearby hues, saved as a quality-95 JPEG."""
    import colorsys
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)

    def colour(h: float, s: float, v: float) -> tuple[int, int, int]:
        return tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h % 1, s, v))

    image = Image.new("RGB", size, colour(hue, 0.8, 0.5 + 0.4 * rng.random()))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(3, 8)):
        x, y = rng.randrange(size[0]), rng.randrange(size[1])
        box = (x, y, x + rng.randint(6, 30), y + rng.randint(6, 30))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape(box, fill=colour(hue + rng.uniform(-0.05, 0.05), rng.random(), rng.random()))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=95)
    return path
