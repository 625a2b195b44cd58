"""How batches reach the part of the network that runs every epoch.

With the exact feature cache, the frozen prefix runs once per image and the loop
trains ``suffix`` on cached rows; without it, the loop runs the whole network on
decoded images. Either way the loop sees one ``module`` and one loader.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from .config import Config
from .device import autocast_dtype, autocast_factory, resolve_workers
from .distributed import SINGLE, Group
from .features import FeatureCache, extract_features, module_fingerprint
from .files import cache_root
from .loaders import ImageList, make_loader
from .model import split_frozen_prefix
from .transforms import eval_transform, train_transform, transform_signature


class Feeder:
    def __init__(
        self,
        model: nn.Module,
        cfg: Config,
        device: torch.device,
        *,
        log: Callable[[str], None] = print,
        progress: bool = True,
        group: Group = SINGLE,
    ):
        self.cfg, self.device, self.log, self.progress, self.group = cfg, device, log, progress, group
        self.dtype = autocast_dtype(device, cfg.train.amp)
        self.autocast = autocast_factory(device, self.dtype)
        self.prefix, self.suffix, self.cut = split_frozen_prefix(model)
        self.workers = resolve_workers(cfg.data, device)
        self.cache_off_reason = self._cache_off_reason(model)
        self.cache: FeatureCache | None = None
        if self.cache_off_reason is None:
            namespace = {
                "arch": cfg.model.arch,
                "cut": self.cut,
                "prefix": module_fingerprint(self.prefix),
                "transform": transform_signature(cfg.data),
                "precision": str(self.dtype or "fp32"),
                "torch": torch.__version__.split("+")[0],
            }
            self.cache = FeatureCache(cache_root(cfg.cache.dir), namespace, log=log)
            self.module = self.suffix
        else:
            self.module = nn.Sequential(self.prefix, self.suffix)
        self.prefix.to(device, memory_format=torch.channels_last)
        self.suffix.to(device)

    def _cache_off_reason(self, model: nn.Module) -> str | None:
        if not self.cfg.cache.enabled:
            return "cache is off"
        if self.cfg.data.augment != "none":
            return f"data.augment is '{self.cfg.data.augment}': random augmentation changes the input every epoch"
        if any(p.requires_grad for p in model.features.parameters()):
            return "part of the backbone is unfrozen (model.unfreeze): its features change every step"
        if self.cut == "input":
            return "nothing at the input is frozen"
        return None

    @property
    def cached(self) -> bool:
        return self.cache is not None

    def dataset(self, samples: Sequence[tuple[str, int]], *, train: bool = False, desc: str = "") -> Dataset:
        if self.cache is None:
            transform = train_transform(self.cfg.data) if train else eval_transform(self.cfg.data)
            return ImageList(samples, transform)
        features = extract_features(
            self.prefix,
            samples,
            eval_transform(self.cfg.data),
            self.cache,
            device=self.device,
            batch_size=self.cfg.data.eval_batch_size,
            num_workers=self.workers,
            autocast=self.autocast,
            progress=self.progress,
            desc=f"Extracting {desc} features".replace("  ", " "),
            group=self.group,
        )
        labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
        return TensorDataset(features, labels)

    def loader(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        sampler: Sampler | None = None,
    ) -> DataLoader:
        workers = 0 if self.cached else self.workers  # cached rows are already in memory
        return make_loader(dataset, batch_size, device=self.device, num_workers=workers,
                           shuffle=shuffle, generator=generator, sampler=sampler)

    def to_device(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.dim() == 4:
            return inputs.to(self.device, non_blocking=True, memory_format=torch.channels_last)
        return inputs.to(self.device, non_blocking=True)
