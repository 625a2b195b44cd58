"""The loop itself: one training epoch, one evaluation pass, and the epochs with validation, best epoch
and early stopping; plus ``fit_head``, which trains a fresh head on rows already in memory and can be
called many times in one process (sweeps, k-fold, lr-find) without touching an image.

Everything takes plain arguments (a module, a loader, a device, a precision) in the manner of
torchvision's reference scripts; nothing here reads a file or a config file.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from vggft.config.schema import TrainConfig
from vggft.data.loaders import make_loader
from vggft.features.rows import RowDataset
from vggft.model.build import set_train_mode
from vggft.model.checkpoints import trainable_state
from vggft.model.novelty import GaussianFit, penultimate_rows
from vggft.reporting.metrics import Metrics
from vggft.training.optim import make_optimizer, make_scheduler
from vggft.training.shared_steps import SharedSteps
from vggft.utils.device import autocast_factory
from vggft.utils.distributed import SINGLE, Group
from vggft.utils.errors import DivergedError
from vggft.utils.logs import log, progress


def to_device(inputs: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch on ``device``; image batches channels-last (the fast layout for convolutions)."""
    if inputs.dim() == 4:
        return inputs.to(device, non_blocking=True, memory_format=torch.channels_last)
    return inputs.to(device, non_blocking=True)


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    precision: torch.dtype | None = None,
    *,
    scaler: torch.amp.GradScaler | None = None,
    scheduler=None,
    grad_clip: float | None = None,
    desc: str = "Training",
) -> dict[str, float]:
    """Forward, loss, backward, step over every batch; returns mean loss, accuracy and samples seen.

    A non-finite loss stops at once (DivergedError): the steps after it would only spread NaN.
    """
    set_train_mode(model)
    autocast = autocast_factory(device, precision)
    loss_sum, correct, seen = 0.0, 0, 0
    for step, (inputs, labels) in enumerate(progress(loader, desc=desc, unit="batch"), start=1):
        inputs, labels = to_device(inputs, device), labels.to(device, non_blocking=True)
        with autocast():
            outputs = model(inputs)
            loss = criterion(outputs, labels)
        value = loss.item()
        _check_finite(value, step, desc)
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
        loss_sum += value * len(labels)
        correct += int((outputs.argmax(dim=1) == labels).sum())
        seen += len(labels)
    return {"loss": loss_sum / max(seen, 1), "acc": correct / max(seen, 1), "seen": seen}


def _check_finite(value: float, step: int, desc: str) -> None:
    """DivergedError when batch ``step``'s loss ``value`` is NaN or infinite, with what to change."""
    if not math.isfinite(value):
        raise DivergedError(
            f"the training loss became {value} at batch {step} of {desc.lower()}; the "
            "settings make training diverge: lower train.lr (or train.momentum), or set "
            "train.grad_clip"
        )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    precision: torch.dtype | None = None,
    *,
    names: Sequence[str],
    ks: Sequence[int] = (1,),
    keep: bool = False,
    desc: str = "Evaluating",
) -> Metrics:
    """Every sample of ``loader`` once: confusion matrix, summed loss, top-k hits (and probabilities if ``keep``).

    ``names`` has one entry per model output.
    """
    model.eval()
    autocast = autocast_factory(device, precision)
    metrics = Metrics.empty(list(names), len(names))
    metrics.topk_correct = {min(k, len(names)): 0 for k in ks}  # the same keys on every rank, even with no batch
    criterion = nn.CrossEntropyLoss(reduction="sum")
    for inputs, labels in progress(loader, desc=desc, unit="batch"):
        inputs, labels = to_device(inputs, device), labels.to(device, non_blocking=True)
        with autocast():
            outputs = model(inputs)
        metrics.update(outputs, labels, float(criterion(outputs.float(), labels)), ks=ks, keep=keep)
    return metrics


def gather_penultimate(
    module: nn.Module,
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    precision: torch.dtype | None,
    classes: int,
    desc: str,
) -> GaussianFit:
    """``module`` (the whole ``model`` or its suffix over cached rows) run over ``loader`` in eval mode, each
    batch's penultimate rows of ``model`` folded into a ``GaussianFit`` and dropped: memory stays the width
    squared, whatever the number of images."""
    module.eval()
    autocast = autocast_factory(device, precision)
    fit = GaussianFit(classes)
    with penultimate_rows(model) as rows, torch.inference_mode():
        for inputs, labels in progress(loader, desc=desc, unit="batch"):
            rows.clear()
            with autocast():
                module(to_device(inputs, device))
            fit.add(torch.cat(rows), labels)
    return fit


# --- the epochs ---------------------------------------------------------------------------------


@dataclass
class Progress:
    """Where a run stands: its history of epoch rows and its best epoch (with the trainable state then)."""

    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"epoch": 0, "val_acc": -1.0})
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def last_epoch(self) -> int:
        return self.history[-1]["epoch"] if self.history else 0


@dataclass
class Loop:
    """What the epochs need: the module that learns, its loaders, and how it steps."""

    module: nn.Module  # what runs every step (the suffix on cached rows, or the whole network; DDP-wrapped)
    model: nn.Module  # the unwrapped model whose trainable state is the checkpoint's
    train_loader: DataLoader
    val_loader: DataLoader | None
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    precision: torch.dtype | None
    names: list[str]
    cfg: TrainConfig
    scaler: torch.amp.GradScaler | None = None
    backbone: list[nn.Parameter] = field(default_factory=list)  # thawed after cfg.head_only_epochs
    group: Group = SINGLE
    sampler: DistributedSampler | None = None  # told the epoch
    threads: int | None = None  # torch's intra-op threads while it trains and validates (None: as they are)


# What a history row (one epoch) holds for metrics.csv and TensorBoard: also val_correct/val_total, kept
# in last.pt's history but not written out.
HISTORY_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")


@dataclass
class EpochEnd:
    row: dict
    improved: bool
    stop: str = ""  # why the run stops after this epoch (early stopping), if it does


def run_epochs(loop: Loop, state: Progress, start: int = 1) -> Iterator[EpochEnd]:
    """Train epochs ``start``..cfg.epochs, validating each; yield after each so the caller can save."""
    cfg = loop.cfg
    for epoch in range(start, cfg.epochs + 1):
        for param in loop.backbone:  # two-stage fine-tuning: the head alone first
            param.requires_grad = epoch > cfg.head_only_epochs
        if loop.sampler is not None:
            loop.sampler.set_epoch(epoch)
        started = time.perf_counter()
        row = {"epoch": epoch, "lr": loop.optimizer.param_groups[0]["lr"]}
        with cpu_threads(loop.threads):
            stats = train_one_epoch(
                loop.module,
                loop.train_loader,
                loop.criterion,
                loop.optimizer,
                loop.device,
                loop.precision,
                scaler=loop.scaler,
                scheduler=loop.scheduler,
                grad_clip=cfg.grad_clip,
                desc=f"Epoch {epoch}/{cfg.epochs}",
            )
        stats = _mean_over_ranks(stats, loop.group)
        row.update(train_loss=stats["loss"], train_acc=stats["acc"])
        if loop.val_loader is not None:
            with cpu_threads(loop.threads):
                val = evaluate(
                    loop.module, loop.val_loader, loop.device, loop.precision, names=loop.names, desc="Validating"
                )
            val = reduce_metrics(val, loop.group)
            row.update(val_loss=val.loss, val_acc=val.accuracy, val_correct=val.correct, val_total=val.total)
        row["seconds"] = time.perf_counter() - started
        state.history.append(row)
        improved = loop.val_loader is None or row["val_acc"] > state.best["val_acc"]
        if improved:
            state.best = {"epoch": epoch, "val_acc": row.get("val_acc", -1.0)}
            state.best_state = {k: v.clone() for k, v in trainable_state(loop.model, loop.optimizer).items()}
        patience = cfg.early_stopping.patience
        stop = ""
        if loop.val_loader is not None and patience and epoch - state.best["epoch"] >= patience:
            stop = (
                f"Early stopping: no better val accuracy for {patience} epoch(s); best was epoch {state.best['epoch']}"
            )
        yield EpochEnd(row, improved, stop)
        if stop:
            break


def row_threads(device: torch.device) -> int | None:
    """Intra-op threads for training a head on cached rows: one on a CPU. A step there is a few small
    matrix products; splitting them over threads whose barriers wait on cores other work holds cost a
    2-core machine 2-3x (measured: an 8-trial sweep 41.6 s with two threads, 12.2 s with one)."""
    return 1 if device.type == "cpu" else None


@contextlib.contextmanager
def cpu_threads(count: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``count`` for the block, then put back (None: left alone)."""
    before = torch.get_num_threads()
    if count is None or count == before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def epoch_line(row: dict, epochs: int) -> str:
    line = f"Epoch {row['epoch']:3d}/{epochs}: loss {row['train_loss']:.4f}, train acc {100 * row['train_acc']:.2f}%"
    if "val_acc" in row:
        line += (
            f", val loss {row['val_loss']:.4f}, val acc@1 {100 * row['val_acc']:.2f}% "
            f"({row['val_correct']}/{row['val_total']})"
        )
    return line + f" ({row['seconds']:.1f}s)"


def restore_best(model: nn.Module, state: Progress) -> bool:
    """Put the best val epoch's trainable state back when it is not the last epoch; True if it did."""
    if state.best_state and 0 < state.best["epoch"] != state.last_epoch:
        model.load_state_dict(state.best_state, strict=False)
        return True
    return False


def _mean_over_ranks(stats: dict[str, float], group: Group) -> dict[str, float]:
    """Each rank's epoch loss and accuracy, weighted by how many samples it saw."""
    if not group.active:
        return stats
    sums = group.sum_(
        torch.tensor([stats["loss"] * stats["seen"], stats["acc"] * stats["seen"], stats["seen"]], dtype=torch.float64)
    )
    return {"loss": float(sums[0] / sums[2]), "acc": float(sums[1] / sums[2]), "seen": int(sums[2])}


def class_weights(labels: torch.Tensor, num_outputs: int) -> torch.Tensor:
    """Inverse-frequency weights (1 for a balanced set; 0 for a class absent from ``labels``)."""
    counts = torch.bincount(labels, minlength=num_outputs).float()
    return torch.where(counts > 0, counts.sum() / (counts.clamp(min=1) * (counts > 0).sum()), torch.zeros(()))


# --- many heads on the same rows -------------------------------------------------------------------


@dataclass(frozen=True)
class HeadOptions:
    """How ``fit_head`` trains a head besides its ``TrainConfig``: the output names, the batch sizes, the
    device, the seed of the shuffle and dropout (None: the config's), and ``data.balance``."""

    names: list[str]
    batch_size: int
    device: torch.device
    seed: int | None = None
    balance: str = "none"
    eval_batch_size: int = 256


@dataclass
class HeadFit:
    """A head trained by ``fit_head``: the module (best val epoch restored), its history and best epoch."""

    module: nn.Module
    history: list[dict]
    best: dict
    seconds: float


ModuleT = TypeVar("ModuleT", bound=nn.Module)


def fresh_head(suffix: ModuleT, seed: int) -> ModuleT:
    """A copy of ``suffix`` whose trainable layers are re-initialised from ``seed``; frozen layers shared
    by value. The global random state is left as it was."""
    head = copy.deepcopy(suffix)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in head.modules():
            reset = getattr(module, "reset_parameters", None)
            if reset is not None and any(p.requires_grad for p in module.parameters(recurse=False)):
                reset()
    return head


def fit_head(
    suffix: nn.Sequential,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor] | None,
    cfg: TrainConfig,
    options: HeadOptions,
    *,
    steps: SharedSteps | None = None,
) -> HeadFit:
    """Train a fresh copy of ``suffix`` on rows and labels already in memory; return it with its history.

    Callable many times in one process: no image is read, no weight re-hashed. The shuffle and the
    dropout draw from ``options.seed`` (default ``cfg.seed``), so the same call gives the same head. ``steps``: a
    ``SharedSteps`` of ``suffix`` shared by the calls (a sweep's trials): the head's frozen leading layers
    run once per step for all of them.
    """
    seed = cfg.seed if options.seed is None else options.seed
    started = time.perf_counter()
    module = fresh_head(suffix, seed).to(options.device)
    if steps is not None:
        assert steps.suffix is suffix, "a SharedSteps serves the heads of the suffix it was made for"
        module = steps.share(module)
    loop = _head_loop(module, train, val, cfg, options, seed)
    state = Progress()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout
        for end in run_epochs(loop, state):
            log.debug(epoch_line(end.row, cfg.epochs))
    restore_best(module, state)
    return HeadFit(module.eval(), state.history, state.best, time.perf_counter() - started)


def _head_loop(
    module: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor] | None,
    cfg: TrainConfig,
    options: HeadOptions,
    seed: int,
) -> Loop:
    """What ``fit_head``'s epochs need for ``module``: loaders over the rows (the train shuffle drawn from
    ``seed``), the loss (class-weighted if ``options.balance`` is "weights"), the optimizer and its schedule."""
    names, device = options.names, options.device
    rows, labels = train
    generator = torch.Generator().manual_seed(seed)
    train_loader = make_loader(
        RowDataset(rows, labels), options.batch_size, device=device, shuffle=True, generator=generator
    )
    val_loader = make_loader(RowDataset(*val), options.eval_batch_size, device=device) if val is not None else None
    weights = class_weights(labels, len(names)).to(device) if options.balance == "weights" else None
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, trainable)
    return Loop(
        module,
        module,
        train_loader,
        val_loader,
        nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.label_smoothing),
        optimizer,
        make_scheduler(cfg, optimizer, len(train_loader)),
        device,
        None,
        names,
        cfg,
        threads=row_threads(device),
    )


def reduce_metrics(metrics: Metrics, group: Group) -> Metrics:
    """Sum each rank's counts: the result is the metrics of the whole split, as one process would get."""
    if not group.active:
        return metrics
    ks = sorted(metrics.topk_correct)
    counts = torch.cat([metrics.confusion.flatten(), torch.tensor([metrics.topk_correct[k] for k in ks])])
    group.sum_(counts)
    loss = group.sum_(torch.tensor([metrics.loss_sum], dtype=torch.float64))
    n = metrics.confusion.numel()
    metrics.confusion = counts[:n].view_as(metrics.confusion).clone()
    metrics.topk_correct = {k: int(v) for k, v in zip(ks, counts[n:], strict=False)}
    metrics.loss_sum = float(loss)
    return metrics
