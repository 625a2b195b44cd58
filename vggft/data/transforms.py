"""The preprocessing presets: the deterministic eval transform and the training augmentations."""

from __future__ import annotations

import torch
from torchvision import transforms as T

from vggft.config.schema import DataConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# (x - 0.5) / 0.5 maps [0, 1] to [-1, 1], the Keras tutorial's `image / 127.5 - 1`.
SYMMETRIC_MEAN = (0.5, 0.5, 0.5)
SYMMETRIC_STD = (0.5, 0.5, 0.5)


def normalization(data: DataConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if data.normalize == "symmetric":
        return SYMMETRIC_MEAN, SYMMETRIC_STD
    return IMAGENET_MEAN, IMAGENET_STD


def eval_transform(data: DataConfig) -> T.Compose:
    """Resize -> CenterCrop -> ToTensor -> Normalize, as the tutorial; or a plain square resize."""
    mean, std = normalization(data)
    if data.resize is None:
        geometry = [T.Resize((data.image_size, data.image_size))]
    else:
        geometry = [T.Resize(data.resize), T.CenterCrop(data.image_size)]
    return T.Compose([*geometry, T.ToTensor(), T.Normalize(mean, std)])


def train_transform(data: DataConfig) -> T.Compose:
    """The eval transform for augment: none; random crops and flips for light/strong."""
    if data.augment == "none":
        return eval_transform(data)
    mean, std = normalization(data)
    size = data.image_size
    if data.augment == "light":
        steps = [T.RandomResizedCrop(size, scale=(0.5, 1.0)), T.RandomHorizontalFlip()]
    else:
        steps = [
            T.RandomResizedCrop(size, scale=(0.25, 1.0)),
            T.RandomHorizontalFlip(),
            T.ColorJitter(0.3, 0.3, 0.3, 0.05),
            T.RandomRotation(15),
        ]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


def preprocessing(data: DataConfig) -> dict:
    """How the eval transform prepares an image: what a user of saved weights needs (the sidecar's keys)."""
    mean, std = normalization(data)
    return {
        "image_size": data.image_size,
        "resize": data.resize,
        "normalize": data.normalize,
        "mean": list(mean),
        "std": list(std),
    }


def transform_signature(data: DataConfig) -> dict:
    """Everything about the eval transform that changes its output (a cache key): ``preprocessing`` less the
    normalize preset's name, which mean and std already say."""
    return {key: value for key, value in preprocessing(data).items() if key != "normalize"}


def denormalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """Undo Normalize: back to [0, 1] pixels for plotting."""
    mean_t = torch.tensor(mean, dtype=images.dtype).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype).view(-1, 1, 1)
    return (images.cpu() * std_t + mean_t).clamp(0, 1)
