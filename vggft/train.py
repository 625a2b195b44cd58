"""The training loop: forward, loss, backward, step, log — the tutorial's story, kept readable.

``fit`` goes from a config to saved weights; ``train_one_epoch`` and ``evaluate`` are
small and return numbers.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import checkpoint
from .config import Config
from .datasets import DataSplits, write_manifest
from .device import prepare_backend, resolve_device
from .errors import ConfigError, OutOfMemoryError
from .feeder import Feeder
from .metrics import Metrics
from .model import build_model, parameter_counts, set_train_mode
from .prepare import prepare_data

Log = Callable[[str], None]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_one_epoch(
    module: nn.Module,
    loader,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    feeder: Feeder,
    *,
    desc: str,
    progress: bool = True,
    grad_clip: float | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    set_train_mode(module)
    loss_sum, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False)
    for inputs, labels in bar:
        inputs, labels = feeder.to_device(inputs), labels.to(feeder.device, non_blocking=True)
        with feeder.autocast():
            outputs = module(inputs)
            loss = criterion(outputs, labels)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        loss_sum += loss.item() * len(labels)
        correct += int((outputs.argmax(dim=1) == labels).sum())
        seen += len(labels)
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
    return {"loss": loss_sum / max(seen, 1), "acc": correct / max(seen, 1)}


@torch.no_grad()
def evaluate(module: nn.Module, loader, feeder: Feeder, class_names: list[str], num_outputs: int,
             *, desc: str = "Evaluating", progress: bool = True) -> Metrics:
    module.eval()
    metrics = Metrics.empty(class_names, num_outputs)
    criterion = nn.CrossEntropyLoss(reduction="sum")
    for inputs, labels in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
        inputs, labels = feeder.to_device(inputs), labels.to(feeder.device, non_blocking=True)
        with feeder.autocast():
            outputs = module(inputs)
        metrics.update(outputs, labels, float(criterion(outputs.float(), labels)))
    return metrics


@dataclass
class TrainResult:
    weights: Path
    sidecar: Path
    class_names: list[str]
    history: list[dict] = field(default_factory=list)
    test: Metrics | None = None


def _class_weights(splits: DataSplits, num_outputs: int) -> torch.Tensor:
    counts = torch.bincount(torch.tensor([label for _, label in splits["train"]]), minlength=num_outputs).float()
    weights = torch.where(counts > 0, counts.sum() / (counts.clamp(min=1) * (counts > 0).sum()), torch.zeros(()))
    return weights


def _sampler(splits: DataSplits, num_outputs: int, generator: torch.Generator):
    labels = torch.tensor([label for _, label in splits["train"]])
    per_sample = _class_weights(splits, num_outputs)[labels]
    return torch.utils.data.WeightedRandomSampler(per_sample.double(), len(labels), replacement=True,
                                                  generator=generator)


def make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov and t.momentum > 0,
                               weight_decay=t.weight_decay)
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


def fit(cfg: Config, *, log: Log = print, progress: bool = True) -> TrainResult:
    """Train as configured, evaluate on test, save the weights and their sidecar."""
    weights_path = Path(cfg.output.weights)
    checkpoint.check_writable(weights_path)
    device = resolve_device(cfg.train.device)
    prepare_backend(device)
    manifest = checkpoint.manifest_path(weights_path)
    splits, _ = prepare_data(cfg, manifest=None, log=log, progress=progress)
    if splits.layout == "pool":
        write_manifest(splits, cfg.data, manifest)
    class_names = splits.class_names
    num_outputs = cfg.model.num_classes or len(class_names)
    if num_outputs < len(class_names):
        raise ConfigError(
            f"model.num_classes: {num_outputs} is fewer than the {len(class_names)} class folders; "
            "set it to null or at least the number of classes"
        )
    sizes = ", ".join(f"{split} {len(splits[split])}" for split in ("train", "val", "test") if splits[split])
    log(f"Data: {splits.root} ({splits.layout}), {len(class_names)} classes, {sizes} images")

    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, num_outputs)
    total, trainable = parameter_counts(model)
    feeder = Feeder(model, cfg, device, log=log, progress=progress)
    dtype = feeder.dtype
    log(f"Model: {cfg.model.arch} ({cfg.model.weights or 'random init'}), head {cfg.model.head}, "
        f"{total:,} parameters, {trainable:,} trainable; device {device}"
        + (f", autocast {str(dtype).removeprefix('torch.')}" if dtype else ""))
    if feeder.cached:
        log(f"Feature cache: frozen prefix up to {feeder.cut}, cached under {feeder.cache.folder or 'memory'}")
    else:
        log(f"Feature cache off: {feeder.cache_off_reason}")

    try:
        datasets = {split: feeder.dataset(splits[split], train=split == "train", desc=split)
                    for split in ("train", "val", "test") if splits[split]}
        generator = torch.Generator().manual_seed(cfg.train.seed)
        sampler = _sampler(splits, num_outputs, generator) if cfg.data.balance == "sampler" else None
        train_loader = feeder.loader(datasets["train"], cfg.data.batch_size, shuffle=True,
                                     generator=generator, sampler=sampler)
        eval_loaders = {split: feeder.loader(datasets[split], cfg.data.eval_batch_size)
                        for split in ("val", "test") if split in datasets}
        loss_weights = _class_weights(splits, num_outputs).to(device) if cfg.data.balance == "weights" else None
        criterion = nn.CrossEntropyLoss(weight=loss_weights, label_smoothing=cfg.train.label_smoothing)
        optimizer = make_optimizer(cfg, model)
        scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
        history = []
        for epoch in range(1, cfg.train.epochs + 1):
            started = time.perf_counter()
            row = {"epoch": epoch}
            stats = train_one_epoch(feeder.module, train_loader, criterion, optimizer, feeder,
                                    desc=f"Epoch {epoch}/{cfg.train.epochs}", progress=progress,
                                    grad_clip=cfg.train.grad_clip, scaler=scaler)
            row.update(train_loss=stats["loss"], train_acc=stats["acc"])
            line = f"Epoch {epoch:3d}/{cfg.train.epochs}: loss {stats['loss']:.4f}, train acc {100 * stats['acc']:.2f}%"
            if "val" in eval_loaders:
                val = evaluate(feeder.module, eval_loaders["val"], feeder, class_names, num_outputs,
                               desc="Validating", progress=progress)
                row.update(val_loss=val.loss, val_acc=val.accuracy)
                line += f", val loss {val.loss:.4f}, val {val.summary_line()}"
            row["seconds"] = time.perf_counter() - started
            history.append(row)
            log(line + f" ({row['seconds']:.1f}s)")
        test = None
        if "test" in eval_loaders:
            test = evaluate(feeder.module, eval_loaders["test"], feeder, class_names, num_outputs,
                            desc="Testing", progress=progress)
            log(f"Test: {test.summary_line()}")
    except torch.OutOfMemoryError:
        raise OutOfMemoryError(
            f"out of memory on {device} with data.batch_size {cfg.data.batch_size} and data.eval_batch_size "
            f"{cfg.data.eval_batch_size}; lower them (--set data.batch_size=...)"
        ) from None

    sidecar = checkpoint.save_trained(
        model, weights_path, cfg, class_names,
        metrics={"test": test.to_dict() if test else None, "history": history},
        manifest=manifest if splits.layout == "pool" else None,
    )
    log(f"Saved {weights_path} (sidecar {sidecar})")
    return TrainResult(weights_path, sidecar, class_names, history, test)
