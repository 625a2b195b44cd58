"""The setup that sweep, lr-find, kfold and label-issues share: data, model and feature cache as ``train``
sets them up, the frozen prefix run once over the images it lacks, then the rows in memory.

After ``prepare`` no image is decoded again: every head those commands train (``training.loop.fit_head``) reads
the cached rows. A config under which the rows cannot be cached (cache off, augmentation, an unfrozen
backbone) is refused in one line: these commands exist because the prefix runs once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from vggft.config.schema import Config
from vggft.data import DataSplits, Sample, find_splits
from vggft.data.folders import output_names
from vggft.features.cache import FeatureSource, cache_off_reason
from vggft.features.rows import Rows
from vggft.model.pretrained import pretrained_file
from vggft.training.loop import HeadOptions
from vggft.training.train import build_network, find_training_data
from vggft.utils.device import autocast_dtype, environment_line, prepare_backend, resolve_device
from vggft.utils.distributed import SINGLE
from vggft.utils.errors import ConfigError
from vggft.utils.files import check_free_space
from vggft.utils.logs import log

SWEEP_VAL_FRACTION = 0.1  # held out of train to score trials when the data has no val split


@dataclass
class PreparedData:
    """The data, the model and its feature source, ready to hand rows to ``training.loop.fit_head``."""

    cfg: Config
    splits: DataSplits
    model: nn.Module
    source: FeatureSource
    device: torch.device

    @property
    def names(self) -> list[str]:
        """One name per model output (``unused_K`` beyond the class folders)."""
        return output_names(self.splits.class_names, self.cfg.model.num_classes or len(self.splits.class_names))

    @property
    def suffix(self) -> nn.Sequential:
        return self.source.suffix

    def rows(self, samples: Sequence[Sample], desc: str) -> tuple[Rows, torch.Tensor]:
        """(rows, labels) of ``samples``: the cached prefix outputs, extracting the ones the cache lacks."""
        labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
        return self.source.rows(samples, desc), labels

    def fit_options(self, cfg: Config | None = None) -> HeadOptions:
        """How ``training.loop.fit_head`` trains a head under this (or a trial's) config."""
        cfg = cfg or self.cfg
        return HeadOptions(
            self.names, cfg.data.batch_size, self.device, cfg.train.seed, cfg.data.balance, cfg.data.eval_batch_size
        )


def refuse_uncached(command: str, reason: tuple[str, str] | None) -> None:
    if reason is not None:
        why, fix = reason
        raise ConfigError(f"{command}: trains every head on the feature cache's rows, but {why}; {fix}")


def with_val_split(cfg: Config, command: str) -> Config:
    """``cfg``, holding out ``SWEEP_VAL_FRACTION`` of train when the data has no val split to score on."""
    found = find_splits(cfg.data)
    if found["val"] or not found["train"]:
        return cfg
    log.info(
        f"{command}: no val split; holding out data.val_fraction={SWEEP_VAL_FRACTION} of train "
        "(stratified) to score on; the test split is never used to choose"
    )
    return replace(cfg, data=replace(cfg.data, val_fraction=SWEEP_VAL_FRACTION))


def prepare(cfg: Config, command: str) -> PreparedData:
    """Data, model and feature source as ``vggft train`` sets them up; nothing extracted yet."""
    refuse_uncached(command, cache_off_reason(cfg))  # before any work
    if cfg.data.balance == "sampler":
        refuse_uncached(
            command,
            (
                "data.balance is 'sampler', which these heads do not use",
                "set data.balance: weights (a weighted loss) or none",
            ),
        )
    device = resolve_device(cfg.train.device)
    prepare_backend(device)
    header = environment_line(command, device, autocast_dtype(device, cfg.train.amp))
    splits = find_training_data(cfg, None, None, SINGLE, header=header)
    model = build_network(cfg, cfg.model.num_classes or len(splits.class_names), SINGLE, device)
    source = FeatureSource(
        model, cfg, device, autocast_dtype(device, cfg.train.amp), weights_file=pretrained_file(cfg.model)
    )
    if not source.cached:
        refuse_uncached(command, source.off)
    log.info(source.describe())
    return PreparedData(cfg, splits, model, source, device)


def extract(data: PreparedData, groups: dict[str, Sequence[Sample]]) -> dict[str, tuple[Rows, torch.Tensor]]:
    """(rows, labels) for each named group of samples, after checking the new rows fit on disk."""
    wanted = [sample for samples in groups.values() for sample in samples]
    needs = data.source.bytes_to_write(wanted)
    if needs is not None:
        check_free_space([(needs[0], needs[1], "cache.dir")])
    return {name: data.rows(samples, name) for name, samples in groups.items()}
