"""The training loop: forward, loss, backward, step, log — the tutorial's story, kept readable.

``fit`` goes from a config to saved weights; ``train_one_epoch`` and ``evaluate`` are
small and return numbers.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler, Subset
from tqdm import tqdm

from . import checkpoint, rng
from .config import Config, load_config
from .datasets import DataSplits, write_manifest
from .device import out_of_memory_hint, prepare_backend, resolve_device
from .distributed import Group, is_peer_failure, process_group, reduce_metrics
from .errors import ConfigError, DataError, VggftError, first_line
from .features import file_key
from .feeder import Feeder
from .files import check_free_space, save_text
from .metrics import Metrics
from .model import build_model, parameter_counts, set_train_mode
from .optim import make_optimizer, make_scheduler
from .plots import save_curves
from .prepare import prepare_data

Log = Callable[[str], None]


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
    scheduler=None,
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
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss.item() * len(labels)
        correct += int((outputs.argmax(dim=1) == labels).sum())
        seen += len(labels)
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
    return {"loss": loss_sum / max(seen, 1), "acc": correct / max(seen, 1), "seen": seen}


@torch.no_grad()
def evaluate(module: nn.Module, loader, feeder: Feeder, class_names: list[str], num_outputs: int,
             *, desc: str = "Evaluating", progress: bool = True, ks=(1, 5), keep: bool = False) -> Metrics:
    module.eval()
    metrics = Metrics.empty(class_names, num_outputs)
    metrics.topk_correct = {min(k, num_outputs): 0 for k in ks}  # the same keys on every rank, even with no batch
    criterion = nn.CrossEntropyLoss(reduction="sum")
    for inputs, labels in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
        inputs, labels = feeder.to_device(inputs), labels.to(feeder.device, non_blocking=True)
        with feeder.autocast():
            outputs = module(inputs)
        metrics.update(outputs, labels, float(criterion(outputs.float(), labels)), ks=ks, keep=keep)
    return metrics


@dataclass
class TrainResult:
    weights: Path
    sidecar: Path
    run_dir: Path
    class_names: list[str]
    history: list[dict] = field(default_factory=list)
    test: Metrics | None = None


def _class_weights(splits: DataSplits, num_outputs: int) -> torch.Tensor:
    counts = torch.bincount(torch.tensor([label for _, label in splits["train"]]), minlength=num_outputs).float()
    return torch.where(counts > 0, counts.sum() / (counts.clamp(min=1) * (counts > 0).sum()), torch.zeros(()))


def _sampler(splits: DataSplits, num_outputs: int, generator: torch.Generator):
    labels = torch.tensor([label for _, label in splits["train"]])
    per_sample = _class_weights(splits, num_outputs)[labels]
    return torch.utils.data.WeightedRandomSampler(per_sample.double(), len(labels), replacement=True,
                                                  generator=generator)


def new_run_dir(runs_dir: str, name: str | None) -> Path:
    """runs/train, runs/train2, ...: an existing run folder is never written into."""
    base = name or "train"
    candidate, n = Path(runs_dir) / base, 1
    while candidate.exists():
        n += 1
        candidate = Path(runs_dir) / f"{base}{n}"
    return candidate


def resume_config(checkpoint_path: Path, overrides: list[str] = ()) -> Config:
    """The config a run was started with, under ``--set`` overrides (e.g. more epochs)."""
    body = checkpoint.load_checkpoint(checkpoint_path)
    return load_config(None, overrides, base=body["config"])


def _mean_over_ranks(stats: dict[str, float], group: Group) -> dict[str, float]:
    """Each rank's epoch loss and accuracy, weighted by how many samples it saw."""
    if not group.active:
        return stats
    sums = group.sum_(torch.tensor([stats["loss"] * stats["seen"], stats["acc"] * stats["seen"], stats["seen"]],
                                   dtype=torch.float64))
    return {"loss": float(sums[0] / sums[2]), "acc": float(sums[1] / sums[2]), "seen": int(sums[2])}


def _disk_needs(cfg: Config, model: nn.Module, feeder: Feeder, splits: DataSplits) -> list[tuple[Path, int, str]]:
    """What this run will write, by folder: the weights, two checkpoints, the features not cached yet."""
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    needs = [(Path(cfg.output.weights).parent, state, "output.weights"),
             (Path(cfg.output.runs_dir), 6 * trainable, "output.runs_dir")]  # last + best, with optimizer state
    if feeder.cache is not None and feeder.cache.folder is not None:
        width = next(m.in_features for m in feeder.suffix.modules() if isinstance(m, nn.Linear))
        missing = sum(file_key(path) not in feeder.cache
                      for split in ("train", "val", "test") for path, _ in splits[split])
        needs.append((feeder.cache.folder, missing * width * 4, "cache.dir"))
    return needs


def _write_metrics(history: list[dict], path: Path) -> None:
    columns = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    save_text(buffer.getvalue(), path)


def fit(cfg: Config, *, resume: Path | None = None, log: Log = print, progress: bool = True) -> TrainResult:
    """Train as configured (or go on from a run's last.pt), evaluate on test, save weights and sidecar.

    Under torchrun every process calls this; they share the work and only rank 0 prints or writes.
    """
    device = resolve_device(cfg.train.device)
    with process_group(device) as (group, device):
        if group.active:
            _check_distributed(cfg)
        if not group.is_main:
            log, progress = _silent, False
        try:
            return _fit(cfg, resume, device, group, log=log, progress=progress)
        except RuntimeError as err:
            if not (group.active and is_peer_failure(err)):
                raise
            error = VggftError(f"another process of this job stopped ({first_line(err)}); its error is above")
            error.rank_specific = True
            raise error from None


def _silent(message: str) -> None:
    pass


def _check_distributed(cfg: Config) -> None:
    if cfg.data.balance == "sampler":
        raise ConfigError("data.balance: 'sampler' cannot shard across processes; use weights (a weighted loss)")
    if cfg.train.head_only_epochs and cfg.model.unfreeze:
        raise ConfigError("train.head_only_epochs: two-stage training is not supported under torchrun yet; "
                          "set it to 0, or run it as one process")


def _fit(cfg: Config, resume: Path | None, device: torch.device, group: Group, *, log: Log,
         progress: bool) -> TrainResult:
    body = checkpoint.load_checkpoint(resume) if resume else None
    if body and cfg.train.scheduler == "onecycle" and body["config"]["train"]["epochs"] != cfg.train.epochs:
        raise ConfigError(f"train.epochs: a onecycle schedule is laid out for the run's "
                          f"{body['config']['train']['epochs']} epochs at its start; resume with that many, "
                          "or start a new run")
    weights_path = Path(cfg.output.weights)
    checkpoint.check_writable(weights_path)
    prepare_backend(device)
    manifest = checkpoint.manifest_path(weights_path)
    if not group.is_main:
        group.barrier()  # rank 0 decodes every image first; the others then read its verdict cache
    splits, _ = prepare_data(cfg, manifest=manifest if body else None, log=log, progress=progress)
    if group.active and group.is_main:
        group.barrier()
    if not splits["train"]:
        raise DataError(f"{splits.root}: no train/ folder; training needs train/<class>/ images "
                        "(a folder with test/ alone can only be evaluated: vggft eval)")
    if splits.layout == "pool" and not body and group.is_main:
        write_manifest(splits, cfg.data, manifest)
    class_names = splits.class_names
    if body and body["class_names"] != class_names:
        raise DataError(f"--resume: the run was trained on classes {body['class_names']}, "
                        f"but {splits.root} has {class_names}; resume on the same data")
    num_outputs = cfg.model.num_classes or len(class_names)
    if num_outputs < len(class_names):
        raise ConfigError(
            f"model.num_classes: {num_outputs} is fewer than the {len(class_names)} class folders; "
            "set it to null or at least the number of classes"
        )
    sizes = ", ".join(f"{split} {len(splits[split])}" for split in ("train", "val", "test") if splits[split])
    log(f"Data: {splits.root} ({splits.layout}), {len(class_names)} classes, {sizes} images")

    rng.seed_everything(cfg.train.seed)
    model = build_model(cfg.model, num_outputs)
    if group.active:
        torch.manual_seed(cfg.train.seed + group.rank)  # the same head everywhere, each rank its own dropout
    backbone = [p for p in model.features.parameters() if p.requires_grad]
    total, trainable = parameter_counts(model)
    feeder = Feeder(model, cfg, device, log=log, progress=progress, group=group)
    log(f"Model: {cfg.model.arch} ({cfg.model.weights or 'random init'}), head {cfg.model.head}, "
        f"{total:,} parameters, {trainable:,} trainable; device {device}"
        + (f" x {group.world} processes" if group.active else "")
        + (f", autocast {str(feeder.dtype).removeprefix('torch.')}" if feeder.dtype else ""))
    if feeder.cached:
        log(f"Feature cache: frozen prefix up to {feeder.cut}, cached under {feeder.cache.folder or 'memory'}")
    else:
        log(f"Feature cache off: {feeder.cache_off_reason}")

    check_free_space(_disk_needs(cfg, model, feeder, splits))

    run_dir: Path | None = None
    memory_hint = out_of_memory_hint(device, {"data.batch_size": cfg.data.batch_size,
                                              "data.eval_batch_size": cfg.data.eval_batch_size})
    try:
        with memory_hint:
            datasets = {split: feeder.dataset(splits[split], train=split == "train", desc=split)
                        for split in ("train", "val", "test") if splits[split]}
            generator = torch.Generator().manual_seed(cfg.train.seed)
            sampler = _sampler(splits, num_outputs, generator) if cfg.data.balance == "sampler" else None
            if group.active:  # each rank a different part of every epoch (padded to equal lengths)
                sampler = DistributedSampler(datasets["train"], group.world, group.rank, seed=cfg.train.seed)
            train_loader = feeder.loader(datasets["train"], cfg.data.batch_size, shuffle=True,
                                         generator=generator, sampler=sampler)
            # Evaluation shards are disjoint and unpadded: every image counted once, then summed over ranks.
            eval_loaders = {split: feeder.loader(Subset(datasets[split], group.shard(range(len(datasets[split])))),
                                                 cfg.data.eval_batch_size)
                            for split in ("val", "test") if split in datasets}
            trainee = feeder.module
            if group.active:
                trainee = DistributedDataParallel(trainee, device_ids=[device.index] if device.type == "cuda" else None)
            loss_weights = _class_weights(splits, num_outputs).to(device) if cfg.data.balance == "weights" else None
            criterion = nn.CrossEntropyLoss(weight=loss_weights, label_smoothing=cfg.train.label_smoothing)
            optimizer = make_optimizer(cfg.train, model, backbone)
            scheduler = make_scheduler(cfg.train, optimizer, len(train_loader))
            scaler = torch.amp.GradScaler(device.type) if feeder.dtype == torch.float16 else None
            history: list[dict] = []
            best = {"epoch": 0, "val_acc": -1.0}
            best_state: dict[str, torch.Tensor] = {}
            start = 1
            if body:
                model.load_state_dict(body["model"], strict=False)
                optimizer.load_state_dict(body["optimizer"])
                scheduler.load_state_dict(body["scheduler"])
                history, best, start = body["history"], body["best"], body["epoch"] + 1
                rng.restore(body["rng"], generator)
                if group.active:  # the checkpoint holds rank 0's RNG; each rank its own dropout again
                    torch.manual_seed(cfg.train.seed + group.rank + 1000 * start)
                if scaler is not None and body.get("scaler"):
                    scaler.load_state_dict(body["scaler"])
                run_dir = Path(resume).parent
                if (run_dir / "best.pt").exists():
                    best_state = checkpoint.load_checkpoint(run_dir / "best.pt")["model"]
                log(f"Resuming {run_dir} after epoch {body['epoch']}")
            elif group.is_main:
                run_dir = new_run_dir(cfg.output.runs_dir, cfg.output.name)
                run_dir.mkdir(parents=True)
            if group.is_main:
                save_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), run_dir / "config.yaml")

            for epoch in range(start, cfg.train.epochs + 1):
                for param in backbone:  # two-stage fine-tuning: the head alone first
                    param.requires_grad = epoch > cfg.train.head_only_epochs
                started = time.perf_counter()
                row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
                if group.active:
                    sampler.set_epoch(epoch)
                stats = train_one_epoch(trainee, train_loader, criterion, optimizer, feeder,
                                        desc=f"Epoch {epoch}/{cfg.train.epochs}", progress=progress,
                                        grad_clip=cfg.train.grad_clip, scaler=scaler, scheduler=scheduler)
                stats = _mean_over_ranks(stats, group)
                row.update(train_loss=stats["loss"], train_acc=stats["acc"])
                line = (f"Epoch {epoch:3d}/{cfg.train.epochs}: loss {stats['loss']:.4f}, "
                        f"train acc {100 * stats['acc']:.2f}%")
                if "val" in eval_loaders:
                    val = reduce_metrics(evaluate(feeder.module, eval_loaders["val"], feeder, class_names,
                                                  num_outputs, desc="Validating", progress=progress), group)
                    row.update(val_loss=val.loss, val_acc=val.accuracy)
                    line += f", val loss {val.loss:.4f}, val {val.summary_line()}"
                row["seconds"] = time.perf_counter() - started
                history.append(row)
                log(line + f" ({row['seconds']:.1f}s)")
                improved = row["val_acc"] > best["val_acc"] if "val" in eval_loaders else True
                if improved:
                    best = {"epoch": epoch, "val_acc": row.get("val_acc", -1.0)}
                    if "val" in eval_loaders:  # without val the best epoch is the last: nothing to restore
                        best_state = {k: v.clone() for k, v in checkpoint.trainable_state(model, optimizer).items()}
                if group.is_main:
                    state = dict(model=model, optimizer=optimizer, scheduler=scheduler, epoch=epoch, cfg=cfg,
                                 class_names=class_names, history=history, best=best, generator=generator,
                                 extra={"scaler": scaler.state_dict()} if scaler is not None else None)
                    checkpoint.save_checkpoint(run_dir / "last.pt", **state)
                    if improved:
                        checkpoint.save_checkpoint(run_dir / "best.pt", **state)
                    _write_metrics(history, run_dir / "metrics.csv")
                    save_curves(history, run_dir / "curves.png")
                patience = cfg.train.early_stopping.patience
                if "val" in eval_loaders and patience and epoch - best["epoch"] >= patience:
                    log(f"Early stopping: no better val accuracy for {patience} epoch(s); "
                        f"best was epoch {best['epoch']}")
                    break
            last = history[-1]["epoch"] if history else 0
            if "val" in eval_loaders and best_state and 0 < best["epoch"] != last:
                # What is tested and saved is the best epoch, as best.pt says, not the last one.
                model.load_state_dict(best_state, strict=False)
                log(f"Restored the best epoch ({best['epoch']}, val acc {100 * best['val_acc']:.2f}%) "
                    "for testing and saving")
            test = None
            if "test" in eval_loaders:
                test = reduce_metrics(evaluate(feeder.module, eval_loaders["test"], feeder, class_names,
                                               num_outputs, desc="Testing", progress=progress), group)
                log(f"Test: {test.summary_line()}")
    except VggftError as err:  # past the pre-flight that every rank shares: this rank's own trouble
        err.rank_specific = True
        raise
    except KeyboardInterrupt:
        if run_dir is not None and (run_dir / "last.pt").exists():
            log(f"Interrupted. Resume with: vggft train --resume {run_dir / 'last.pt'}")
        raise

    sidecar = checkpoint.sidecar_path(weights_path)
    if not group.is_main:
        return TrainResult(weights_path, sidecar, run_dir, class_names, history, test)
    checkpoint.save_trained(
        model, weights_path, cfg, class_names,
        metrics={"test": test.to_dict() if test else None, "history": history, "run": str(run_dir)},
        manifest=manifest if splits.layout == "pool" else None,
    )
    log(f"Saved {weights_path} (sidecar {sidecar}); run folder {run_dir}: config.yaml, metrics.csv, "
        "last.pt, best.pt, curves.png")
    return TrainResult(weights_path, sidecar, run_dir, class_names, history, test)
