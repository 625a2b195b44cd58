"""The typed configuration: every key in one of the dataclasses below, with its default, its type and the
check of its value. Loading (YAML, ``--set``, conversion and messages) is ``config.loading``."""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

ARCHS = ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn")


Arch = Literal["vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"]


def _positive(value: Any) -> str | None:
    return None if value > 0 else "a number greater than 0"


def _non_negative(value: Any) -> str | None:
    return None if value >= 0 else "a number of 0 or more"


MIN_IMAGE_SIZE = 32  # VGG's five max-pools halve the input five times: 32 px is the least that leaves a pixel


def _image_size(value: Any) -> str | None:
    return None if value >= MIN_IMAGE_SIZE else f"{MIN_IMAGE_SIZE} or more (VGG's five max-pools halve it to 1 px)"


def _workers(value: Any) -> str | None:
    return None if value == "auto" or value >= 0 else "'auto' or a number of 0 or more"


def _fraction(value: Any) -> str | None:
    return None if 0 <= value < 1 else "a fraction from 0 up to (not including) 1"


MAX_SEED = 2**63 - 1  # torch and numpy seed from 64 bits; a rank and epoch are added under torchrun


def _seed(value: int) -> str | None:
    return None if 0 <= value <= MAX_SEED else f"a whole number from 0 to {MAX_SEED}"


def _split(value: list[float]) -> str | None:
    if len(value) != 3 or any(part < 0 for part in value) or abs(sum(value) - 1) > 1e-6:
        return "three fractions [train, val, test] that add up to 1, e.g. [0.8, 0.1, 0.1]"
    if value[0] <= 0 or value[2] <= 0:
        return "a split with a non-zero train and test fraction"
    return None


DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _device(value: str) -> str | None:
    """Spelling only (torch-free); whether the device is present is asked when it is used."""
    return None if DEVICE.fullmatch(value.strip().lower()) else "auto, cpu, cuda, cuda:N or mps"


def _check(check, **kwargs) -> Any:
    """A dataclass field with a validity check run after type conversion."""
    return field(metadata={"check": check}, **kwargs)


@dataclass
class DataConfig:
    root: str = "data/pet"
    """Holds train/ and test/ (optionally val/) of class folders, or one pool of class folders."""
    image_size: int = _check(_image_size, default=224)
    """Side of the square the network sees, in pixels (32 or more: VGG halves it five times)."""
    resize: int | None = _check(_positive, default=256)
    """Shorter side is resized to this, then centre-cropped to image_size; null squashes
    the whole image to image_size x image_size (the Keras recipe)."""
    normalize: Literal["imagenet", "symmetric"] = "imagenet"
    """imagenet: torchvision's mean/std; symmetric: pixels scaled to [-1, 1]."""
    batch_size: int = _check(_positive, default=4)
    """Training batch size (per process under torchrun)."""
    eval_batch_size: int = _check(_positive, default=32)
    """Batch size of feature extraction and evaluation: no gradients, so it can be larger."""
    num_workers: int | Literal["auto"] = _check(_workers, default="auto")
    """DataLoader worker processes; auto: the cores on CUDA, none on a small CPU."""
    decode: Literal["auto", "pil", "draft", "gpu"] = "auto"
    """How feature extraction decodes images. pil: Pillow in the DataLoader workers. draft: Pillow, but a
    JPEG is decoded with DCT scaling (Image.draft) at the smallest 1/2, 1/4 or 1/8 scale still at least the
    resize target (a phone photo decodes several times faster; docs/performance.md measures the effect on
    features); smaller JPEGs and other formats exactly as pil. gpu: the workers read file bytes; batches
    of JPEGs are decoded by torchvision.io.decode_jpeg on the device and resized, cropped and normalised
    there as tensors (without CUDA the same tensor path runs on the CPU); a file it cannot take (PNG, CMYK,
    progressive, EXIF-rotated, rejected) goes through Pillow, counted in a note.
    auto: gpu on CUDA, draft elsewhere. Part of the feature-cache key (tensor resizing and draft decoding
    differ slightly from Pillow's); training on decoded images (cache off) always uses plain Pillow."""
    split: list[float] = _check(_split, default_factory=lambda: [0.8, 0.1, 0.1])
    """How a single pool of class folders is split into train/val/test (stratified)."""
    split_seed: int = 0
    """Seed of the pool split (and of carving val_fraction out of train)."""
    val_fraction: float = _check(_fraction, default=0.0)
    """Carve this fraction of train out as validation when there is no val split."""
    bad_images: Literal["skip", "error"] = "skip"
    """Unreadable images: skip them (reported once), or stop before any training."""
    balance: Literal["none", "weights", "sampler"] = "none"
    """Class imbalance: weights (class-weighted loss) or sampler (weighted sampling)."""
    augment: Literal["none", "light", "strong"] = "none"
    """Training augmentation: light (random resized crop, flip) or strong (wider crop, colour jitter,
    rotation); either turns the feature cache off."""


@dataclass
class ModelConfig:
    arch: Arch = "vgg16"
    """The torchvision VGG architecture; _bn: with batch norm."""
    weights: str | None = "IMAGENET1K_V1"
    """A torchvision weights name (IMAGENET1K_V1, DEFAULT), a local .pth state_dict, or null."""
    head: Literal["classifier6", "gap"] = "classifier6"
    """classifier6: VGG's last Linear swapped for n outputs (the PyTorch tutorial); gap: global average
    pool, Linear(512, 512), ReLU, Linear(512, n) (the Keras tutorial)."""
    num_classes: int | None = _check(_positive, default=None)
    """null: the number of class folders in the training split."""
    dropout: float = _check(_fraction, default=0.5)
    """Dropout of VGG's classifier (0.5 in torchvision); applies to the classifier6 head."""
    unfreeze: list[str] | int = 0
    """Conv blocks to train too: a list such as [block5], or a count from the top."""


def weights_is_file(weights: str) -> bool:
    """Whether a ``model.weights`` value names a file (a .pth/.pt/.bin/.ckpt name, a path, or anything that exists)
    rather than a torchvision weights name such as IMAGENET1K_V1."""
    path = Path(weights).expanduser()
    return path.suffix in (".pth", ".pt", ".bin", ".ckpt") or os.sep in weights or path.exists()


@dataclass
class EarlyStoppingConfig:
    patience: int | None = _check(_positive, default=None)
    """Stop after this many epochs without a better val accuracy; null: never."""


@dataclass
class TrainConfig:
    epochs: int = _check(_positive, default=5)
    """Passes over the training split."""
    lr: float = _check(_positive, default=1.0e-4)
    """Learning rate of the head."""
    backbone_lr: float | None = _check(_positive, default=None)
    """Learning rate of unfrozen backbone blocks; null: lr / 10."""
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    """sgd: the PyTorch tutorial's (with momentum and nesterov below); adam; adamw (decoupled weight decay)."""
    momentum: float = _check(_non_negative, default=0.0)
    """SGD momentum."""
    nesterov: bool = False
    """Nesterov momentum (sgd with momentum > 0)."""
    weight_decay: float = _check(_non_negative, default=0.0)
    """L2 penalty of the optimizer (adamw: decoupled from the gradient), on every trainable parameter."""
    scheduler: Literal["none", "cosine", "step", "onecycle"] = "none"
    """cosine: to 0 over the epochs after warmup; step: x gamma every step_size epochs; onecycle: torch's
    OneCycleLR peaking at lr. All step every batch."""
    warmup_epochs: int = _check(_non_negative, default=0)
    """Linear warmup from 0 to lr over this many epochs, then the scheduler (none: lr stays); not with onecycle,
    which warms up by itself."""
    step_size: int = _check(_positive, default=10)
    """Epochs between learning-rate drops of scheduler step."""
    gamma: float = _check(_positive, default=0.1)
    """Factor of each drop of scheduler step."""
    label_smoothing: float = _check(_fraction, default=0.0)
    """Cross-entropy label smoothing."""
    grad_clip: float | None = _check(_positive, default=None)
    """Largest gradient norm; null: no clipping."""
    early_stopping: EarlyStoppingConfig = field(default_factory=lambda: EarlyStoppingConfig())
    head_only_epochs: int = _check(_non_negative, default=0)
    """Two-stage fine-tuning: train the head alone this many epochs, then the model.unfreeze blocks too."""
    seed: int = _check(_seed, default=0)
    """Seeds the head's initialisation, shuffling and dropout."""
    device: str = _check(_device, default="auto")
    """auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps."""
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    """Autocast: auto is bf16 (or fp16) on CUDA, bf16 on a CPU that computes it natively (AMX or
    AVX512-BF16, as torch reports) and fp32 on other CPUs and MPS; off: always fp32. The log's first line
    says which was chosen and why; the feature cache keeps each precision's rows apart."""
    calibrate: bool = True
    """Fit a softmax temperature on the val split after training (Guo et al. 2017) and store it in the
    sidecar, so that predict reports calibrated probabilities; needs a val split. false: don't."""


@dataclass
class CacheConfig:
    enabled: bool = True
    """Cache the frozen prefix's features on disk; `cache: off` is short for enabled: false."""
    dir: str | None = None
    """null: $VGGFT_CACHE, else $XDG_CACHE_HOME/vggft, else ~/.cache/vggft."""


@dataclass
class OutputConfig:
    weights: str = "models/VGG16.pt"
    """The trained weights; a sidecar with the same stem and .json records the rest."""
    full_weights: bool = True
    """true: output.weights is the whole network as a plain state_dict (the tutorial's own code loads it;
    537 MB for VGG-16). false: only what training changed (the head: kilobytes) with the frozen part's
    fingerprint; eval, predict, explain and export rebuild the rest from model.weights and check it."""
    runs_dir: str = "runs"
    """Each train writes runs_dir/<name>/: config, metrics.csv, last.pt, best.pt, plots."""
    name: str | None = None
    """Run folder name; null: train, train2, train3, ..."""
    tensorboard: bool = False
    """Also write the epoch scalars of metrics.csv, the curves and the test confusion matrix as TensorBoard
    events under the run folder's tensorboard/ (needs the tensorboard package: pip install 'vggft[tensorboard]')."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def all_keys(cls: type | None = None, prefix: str = "") -> list[str]:
    """Every dotted key of the config, e.g. 'train.epochs'."""
    cls = cls or Config
    keys: list[str] = []
    for name, hint in typing.get_type_hints(cls).items():
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            keys += all_keys(hint, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def describe_type(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(describe_type(option) for option in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin is list:
        item = describe_type(typing.get_args(hint)[0])
        return f"a list of {item.removeprefix('a ')}s"
    return {bool: "true/false", int: "a whole number", float: "a number", str: "a non-empty string"}[hint]
