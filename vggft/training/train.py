"""``vggft train``: from a config to saved weights, as setup → epochs → finish.

Setup finds the data, builds the model, decides between cached rows and images, and extracts what the
cache lacks; the epochs are ``loop.run_epochs`` with a checkpoint after each; finishing puts
the best val epoch back, tests it and saves weights and sidecar. Under torchrun every process calls
``fit``; they share the work and only rank 0 prints or writes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset, WeightedRandomSampler
from torchvision import models

from vggft.config.loading import load_config, resume_overrides_refused
from vggft.config.schema import Config
from vggft.data import DataSplits, prepare_data, split_record
from vggft.data.folders import output_names
from vggft.data.loaders import make_loader, stop_workers
from vggft.features.cache import FeatureSource
from vggft.model.build import build_model, parameter_counts
from vggft.model.checkpoints import LIGHT_KIND, check_frozen, load_checkpoint, save_checkpoint, trainable_state
from vggft.model.fingerprint import frozen_fingerprint
from vggft.model.novelty import penultimate_rows
from vggft.model.pretrained import pretrained_file, pretrained_state_dict
from vggft.model.weights import TrustRecord, check_writable, save_trained, sidecar_path
from vggft.reporting.metrics import Metrics
from vggft.reporting.runs import save_results, weights_record
from vggft.training import tensorboard as tensorboard_log
from vggft.training.calibration import TemperatureFit, expected_calibration_error, fit_temperature, fit_trust
from vggft.training.loop import (
    HISTORY_COLUMNS,
    Loop,
    Progress,
    class_weights,
    epoch_line,
    evaluate,
    gather_penultimate,
    reduce_metrics,
    restore_best,
    row_threads,
    run_epochs,
)
from vggft.training.optim import make_optimizer, make_scheduler
from vggft.utils import rng
from vggft.utils.device import (
    PRECISION,
    autocast_dtype,
    environment_line,
    out_of_memory_hint,
    prepare_backend,
    resolve_device,
)
from vggft.utils.distributed import Group, is_peer_failure, is_timeout, main_first, process_group, stalled
from vggft.utils.errors import (
    ConfigError,
    DataError,
    DivergedError,
    Interrupted,
    OutputError,
    VggftError,
    WeightsError,
    first_line,
)
from vggft.utils.files import check_folder, check_free_space, check_name_length, save_csv, save_text
from vggft.utils.locks import train_locks
from vggft.utils.logs import log, silence

RUN_FILES = "config.yaml, metrics.csv, last.pt, best.pt, curves.png"


@dataclass
class TrainResult:
    weights: Path
    sidecar: Path
    run_dir: Path | None  # None on the ranks other than 0, which write no run folder
    class_names: list[str]
    history: list[dict] = field(default_factory=list)
    test: Metrics | None = None


@dataclass
class Run:
    """One training run as set up: what the epochs and the finish need."""

    cfg: Config
    splits: DataSplits
    model: nn.Module
    source: FeatureSource
    loop: Loop
    state: Progress
    generator: torch.Generator
    run_dir: Path | None  # set on rank 0 alone (the other ranks write nothing)
    test_loader: DataLoader | None
    fingerprint: str
    start: int = 1
    board: tensorboard_log.TensorBoardLog | None = None  # output.tensorboard, rank 0
    curves: _Curves | None = None  # curves.png, drawn on a thread of its own (rank 0)

    @property
    def folder(self) -> Path:
        """``run_dir``, where rank 0 writes: only rank 0 asks for it, once the run is set up."""
        assert self.run_dir is not None, "only rank 0 has a run folder, from setup on"
        return self.run_dir

    @property
    def split(self) -> dict | None:
        return split_record(self.splits, self.cfg.data) if self.splits.layout == "pool" else None


RUNS_DIR_FIX = "choose another folder with --set output.runs_dir=PATH"


def check_run_folder(cfg: Config, default_name: str = "train", *, new: bool = True) -> None:
    """Before any work: the runs folder can be written and, for a ``new`` run (a resumed one has its folder),
    the run's name fits (a number may be added)."""
    check_folder(cfg.output.runs_dir, "output.runs_dir", RUNS_DIR_FIX)
    if new:
        check_name_length(
            Path(cfg.output.runs_dir) / (cfg.output.name or default_name), "output.name (--name)", spare=4
        )


def make_run_folder(cfg: Config, default_name: str = "train") -> Path:
    """A new run folder, runs/<name>, runs/<name>2, ... (an existing one is never written into), holding the
    config it ran with."""
    base = cfg.output.name or default_name
    folder, n = Path(cfg.output.runs_dir) / base, 1
    while True:
        try:
            folder.mkdir(parents=True)
            break
        except FileExistsError:  # an earlier run's, or another's that took this name just now: the next number
            if not folder.exists():  # a file where a parent folder belongs
                raise OutputError(f"output.runs_dir: cannot make the run folder '{folder}'; {RUNS_DIR_FIX}") from None
            n += 1
            folder = Path(cfg.output.runs_dir) / f"{base}{n}"
        except OSError as err:
            raise OutputError(
                f"output.runs_dir: cannot make the run folder '{folder}' ({err.strerror}); {RUNS_DIR_FIX}"
            ) from None
    write_run_config(cfg, folder)
    return folder


def write_run_config(cfg: Config, folder: Path) -> None:
    save_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), folder / "config.yaml")


def resume_config(checkpoint_path: Path, overrides: Sequence[str] = ()) -> Config:
    """The config a run was started with, under the ``--set`` overrides that can still take effect."""
    return read_resume(checkpoint_path, overrides)[0]


def read_resume(checkpoint_path: Path, overrides: Sequence[str] = ()) -> tuple[Config, dict]:
    """``resume_config`` and the checkpoint itself, read once: pass it on to ``fit(checkpoint=...)``."""
    resume_overrides_refused(list(overrides))
    body = load_checkpoint(checkpoint_path)
    if body.get("kind") == LIGHT_KIND:
        raise WeightsError(
            f"--resume: '{checkpoint_path}' is a run's saved weights (output.full_weights: false), not its "
            "last.pt; go on with runs/<name>/last.pt of that run, or start a new run"
        )
    if body.get("kind") == "best":
        raise WeightsError(
            f"--resume: '{checkpoint_path}' is the run's best epoch ({body['epoch']}), kept for "
            f"eval, predict and export; go on with {Path(checkpoint_path).with_name('last.pt')}, "
            "or start a new run"
        )
    return load_config(None, overrides, base=body["config"]), body


def fit(cfg: Config, *, resume: Path | None = None, checkpoint: dict | None = None) -> TrainResult:
    """Train as configured (or go on from a run's last.pt), evaluate on test, save weights and sidecar.

    ``checkpoint``: the body of ``resume``, when ``read_resume`` has read it already."""
    started = time.monotonic()  # the run's seconds in results.json
    device = resolve_device(cfg.train.device)
    if cfg.output.tensorboard:
        tensorboard_log.require()  # before any work
    with process_group(device) as (group, device), train_locks(cfg.output.weights, resume, enabled=group.is_main):
        if group.active:
            _check_distributed(cfg)
        if not group.is_main:
            silence()  # rank 0 speaks for the job
        try:
            run = _setup(cfg, resume, device, group, checkpoint)
            memory = out_of_memory_hint(
                device, {"data.batch_size": cfg.data.batch_size, "data.eval_batch_size": cfg.data.eval_batch_size}
            )
            try:
                with memory:
                    test = _train(run)
                return _finish(run, test, started)
            finally:
                stop_workers(run.loop.train_loader, run.loop.val_loader)
                if run.curves is not None:
                    run.curves.settle()  # no thread left writing once fit has returned or raised
        except VggftError as err:  # past the pre-flight that every rank shares, an error is this rank's own
            err.rank_specific = err.rank_specific or "run" in locals()
            raise
        except RuntimeError as err:
            if group.active and is_timeout(err):
                raise stalled(group, err) from None
            if not (group.active and is_peer_failure(err)):
                raise
            error = VggftError(f"another process of this job stopped ({first_line(err)}); its error is above")
            error.rank_specific = True
            raise error from None


def _check_distributed(cfg: Config) -> None:
    if cfg.data.balance == "sampler":
        raise ConfigError("data.balance: 'sampler' cannot shard across processes; use weights (a weighted loss)")
    if cfg.train.head_only_epochs and cfg.model.unfreeze:
        raise ConfigError(
            "train.head_only_epochs: two-stage training is not supported under torchrun yet; "
            "set it to 0, or run it as one process"
        )


# --- setup ------------------------------------------------------------------------------------------


def _setup(cfg: Config, resume: Path | None, device: torch.device, group: Group, body: dict | None = None) -> Run:
    if resume and body is None:
        body = load_checkpoint(resume)
    if body and cfg.train.scheduler == "onecycle" and body["config"]["train"]["epochs"] != cfg.train.epochs:
        raise ConfigError(
            f"train.epochs: a onecycle schedule is laid out for the run's "
            f"{body['config']['train']['epochs']} epochs at its start; resume with that many, "
            "or start a new run"
        )
    check_writable(Path(cfg.output.weights))
    check_run_folder(cfg, new=not resume)
    prepare_backend(device)
    precision = autocast_dtype(device, cfg.train.amp)
    header = environment_line("train", device, precision)
    splits = find_training_data(cfg, body, resume, group, header=header)
    num_outputs = cfg.model.num_classes or len(splits.class_names)
    model = build_network(cfg, num_outputs, group, device)
    source = FeatureSource(model, cfg, device, precision, group, weights_file=pretrained_file(cfg.model))
    log.info(source.describe())
    _check_disk(cfg, model, source, splits)
    with out_of_memory_hint(device, {"data.eval_batch_size": cfg.data.eval_batch_size}):
        loop, generator, test_loader = _make_loop(cfg, model, source, splits, device, source.module_precision, group)
    fingerprint = frozen_fingerprint(model, trainable_state(model, loop.optimizer), source.prefix_weights)
    run = Run(cfg, splits, model, source, loop, Progress(), generator, None, test_loader, fingerprint)
    if body:
        assert resume is not None, "a checkpoint body is read from --resume"
        _restore(run, body, Path(resume))
        if group.is_main:
            write_run_config(cfg, run.folder)  # the resumed config: its --set overrides included
    elif group.is_main:
        run.run_dir = make_run_folder(cfg)
    if group.is_main:
        run.board = tensorboard_log.TensorBoardLog(run.folder) if cfg.output.tensorboard else None
    return run


def find_training_data(
    cfg: Config, body: dict | None, resume: Path | None, group: Group, *, header: str = ""
) -> DataSplits:
    """The splits a run trains on (a resumed run's own pool split from its checkpoint ``body``), checked; the
    log's ``header`` comes once they are (a refusal before it stays one line)."""
    with main_first(group):  # rank 0 decodes every image first; the others then read its verdict cache
        splits, _ = prepare_data(cfg, body.get("split") if body else None, f"--resume {resume}", to_train=True)
    if not splits["train"]:
        raise DataError(
            f"{splits.root}: no train/ folder; training needs train/<class>/ images "
            "(a folder with test/ alone can only be evaluated: vggft eval)"
        )
    if body and body["class_names"] != splits.class_names:
        raise DataError(
            f"--resume: the run was trained on classes {body['class_names']}, "
            f"but {splits.root} has {splits.class_names}; resume on the same data"
        )
    if cfg.model.num_classes and cfg.model.num_classes < len(splits.class_names):
        raise ConfigError(
            f"model.num_classes: {cfg.model.num_classes} is fewer than the {len(splits.class_names)} "
            "class folders; set it to null or at least the number of classes"
        )
    if cfg.train.early_stopping.patience and not splits["val"]:
        raise ConfigError(
            "train.early_stopping.patience: needs a val split to watch, and there is none; add a "
            "val/ folder, set data.val_fraction (e.g. 0.1), or remove early_stopping.patience"
        )
    sizes = ", ".join(f"{split} {len(splits[split])}" for split in ("train", "val", "test") if splits[split])
    if header:
        log.info(header)
    log.info(f"Data: {splits.root} ({splits.layout}), {len(splits.class_names)} classes, {sizes} images")
    return splits


def build_network(cfg: Config, num_outputs: int, group: Group, device: torch.device) -> nn.Module:
    """The seeded network with its pretrained weights and new head, as every training command starts it."""
    rng.seed_everything(cfg.train.seed)
    model = build_model(cfg.model, num_outputs, pretrained_state_dict(cfg.model))
    if group.active:
        torch.manual_seed(cfg.train.seed + group.rank)  # the same head everywhere, each rank its own dropout
    total, trainable = parameter_counts(model)
    log.info(
        f"Model: {cfg.model.arch} ({cfg.model.weights or 'random init'}), head {cfg.model.head}, "
        f"{total:,} parameters, {trainable:,} trainable; device {device}"
        + (f" x {group.world} processes" if group.active else "")
    )
    return model


def _check_disk(cfg: Config, model: nn.Module, source: FeatureSource, splits: DataSplits) -> None:
    """Before any work: the weights, two checkpoints and the rows not cached yet must fit."""
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    needs = [
        (Path(cfg.output.weights).parent, state, "output.weights"),
        (Path(cfg.output.runs_dir), 8 * trainable, "output.runs_dir"),
    ]  # last (with best and optimizer), best
    rows = source.bytes_to_write([s for split in ("train", "val", "test") for s in splits[split]])
    if rows is not None:
        needs.append((rows[0], rows[1], "cache.dir"))
    check_free_space(needs)


def _make_loop(
    cfg: Config,
    model: models.VGG,
    source: FeatureSource,
    splits: DataSplits,
    device: torch.device,
    precision,
    group: Group,
) -> tuple[Loop, torch.Generator, DataLoader | None]:
    num_outputs = cfg.model.num_classes or len(splits.class_names)
    labels = torch.tensor([label for _, label in splits["train"]])
    generator = torch.Generator().manual_seed(cfg.train.seed)
    train_loader, shard, distributed = _loaders(cfg, source, splits, labels, num_outputs, device, generator, group)
    module: nn.Module = source.module
    if group.active:
        module = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    loss_weights = class_weights(labels, num_outputs).to(device) if cfg.data.balance == "weights" else None
    backbone = [p for p in model.features.parameters() if p.requires_grad]
    features = {id(p) for p in model.features.parameters()}
    head = [p for p in model.parameters() if id(p) not in features and p.requires_grad]
    optimizer = make_optimizer(cfg.train, head, backbone)
    scaler = torch.amp.GradScaler(device.type) if precision == torch.float16 else None
    loop = Loop(
        module,
        model,
        train_loader,
        shard.get("val"),
        nn.CrossEntropyLoss(weight=loss_weights, label_smoothing=cfg.train.label_smoothing),
        optimizer,
        make_scheduler(cfg.train, optimizer, len(train_loader)),
        device,
        precision,
        output_names(splits.class_names, num_outputs),
        cfg.train,
        scaler,
        backbone,
        group,
        distributed,
        threads=row_threads(device) if source.cached else None,
    )
    return loop, generator, shard.get("test")


def _loaders(
    cfg: Config,
    source: FeatureSource,
    splits: DataSplits,
    labels: torch.Tensor,
    num_outputs: int,
    device: torch.device,
    generator: torch.Generator,
    group: Group,
) -> tuple[DataLoader, dict[str, DataLoader], DistributedSampler[int] | None]:
    """The endless train loader (shuffled, or drawn by ``data.balance: sampler``), the val and test loaders
    over this process's shard, and the sampler the loop tells the epoch, if any."""
    datasets = {
        split: source.dataset(splits[split], train=split == "train", desc=split)
        for split in ("train", "val", "test")
        if splits[split]
    }
    sampler, distributed = _train_sampler(cfg, datasets["train"], labels, num_outputs, generator, group)
    workers = source.loader_workers
    train_loader = make_loader(
        datasets["train"],
        cfg.data.batch_size,
        device=device,
        num_workers=workers,
        shuffle=True,
        generator=generator,
        sampler=sampler,
        repeat=True,
    )
    # Evaluation shards are disjoint and unpadded: every image counted once, then summed over ranks.
    shard: dict[str, DataLoader] = {
        split: make_loader(
            Subset(datasets[split], group.shard(range(len(datasets[split])))),
            cfg.data.eval_batch_size,
            device=device,
            num_workers=workers,
            repeat=split == "val",
        )
        for split in ("val", "test")
        if split in datasets
    }
    return train_loader, shard, distributed


def _train_sampler(
    cfg: Config, dataset: Dataset, labels: torch.Tensor, num_outputs: int, generator: torch.Generator, group: Group
) -> tuple[Sampler[int] | None, DistributedSampler[int] | None]:
    """The train loader's sampler (None: it shuffles), and again the one the loop tells the epoch, if any."""
    if group.active:  # each rank a different part of every epoch (padded to equal lengths)
        distributed: DistributedSampler[int] = DistributedSampler(dataset, group.world, group.rank, seed=cfg.train.seed)
        return distributed, distributed
    if cfg.data.balance == "sampler":
        weights = class_weights(labels, num_outputs)[labels].double()
        sampler = WeightedRandomSampler(
            weights,  # type: ignore[arg-type]  # torch's stubs say Sequence[float]; it takes (and documents) a tensor
            len(labels),
            replacement=True,
            generator=generator,
        )
        return sampler, None
    return None, None


def _restore(run: Run, body: dict, resume: Path) -> None:
    """Go on exactly where ``last.pt`` left off: weights, optimizer, schedule, RNG, history, best epoch."""
    loop = run.loop
    check_frozen(run.model, body, resume, "--resume", "start a new run", current=run.fingerprint)
    wanted = set(trainable_state(run.model, loop.optimizer))
    if wanted - set(body["model"]) or set(body["model"]) - set(run.model.state_dict()):
        raise WeightsError(
            f"--resume: '{resume}' does not hold the trainable part of this model "
            f"({run.cfg.model.arch}, head {run.cfg.model.head}); resume with the run's own last.pt"
        )
    run.model.load_state_dict(body["model"], strict=False)
    loop.optimizer.load_state_dict(body["optimizer"])
    loop.scheduler.load_state_dict(body["scheduler"])
    run.state = Progress(body["history"], body["best"], _best_state(body, resume))
    run.start = body["epoch"] + 1
    rng.restore(body["rng"], run.generator)
    if loop.group.active:  # the checkpoint holds rank 0's RNG; each rank its own dropout again
        torch.manual_seed(run.cfg.train.seed + loop.group.rank + 1000 * run.start)
    if loop.scaler is not None and body.get("scaler"):
        loop.scaler.load_state_dict(body["scaler"])
    run.run_dir = resume.parent
    if loop.group.is_main and run.state.best_state:  # best.pt is what last.pt says is best, whatever a kill left
        save_checkpoint(resume.parent / "best.pt", _best_body(run))
    log.info(f"Resuming {resume.parent} after epoch {body['epoch']}")


def _best_state(body: dict, resume: Path) -> dict[str, torch.Tensor]:
    if body.get("best_model"):
        return body["best_model"]
    best = resume.with_name("best.pt")  # format 1 kept the best epoch in best.pt alone
    return load_checkpoint(best)["model"] if best.is_file() else {}


# --- the epochs -------------------------------------------------------------------------------------


def _train(run: Run) -> Metrics | None:
    """The epochs, a checkpoint after each; then the best val epoch back and scored on test."""
    loop, main = run.loop, run.loop.group.is_main
    if main and run.run_dir is not None:
        run.curves = _Curves(on_thread=run.source.loader_workers == 0)
    try:
        for end in run_epochs(loop, run.state, run.start):
            log.info(epoch_line(end.row, run.cfg.train.epochs))
            if main:
                if end.improved:  # best.pt first: last.pt, written second, is the unit's authority
                    save_checkpoint(run.folder / "best.pt", _best_body(run))
                save_checkpoint(run.folder / "last.pt", _last_body(run))
                _write_metrics(run.state.history, run.folder / "metrics.csv")
                if run.board:
                    run.board.add_epoch(end.row)
            if end.stop:
                log.info(end.stop)
    except KeyboardInterrupt:
        last = run.run_dir / "last.pt" if run.run_dir is not None else None
        if last is None or not last.exists():
            raise Interrupted("Interrupted before the first epoch ended; nothing to resume from") from None
        raise Interrupted(
            f"Interrupted: {last} holds epoch {run.state.last_epoch}; go on with: vggft train --resume {last}"
        ) from None
    except DivergedError as err:
        if run.curves is not None and run.state.history:
            _draw_curves(run, run.curves)
            run.curves.wait()
        last = run.run_dir / "last.pt" if run.run_dir else None
        kept = f"; the last good epoch ({run.state.last_epoch}) is kept in {last}" if run.state.history else ""
        raise DivergedError(f"{err}{kept}") from None
    if run.curves is not None:
        _draw_curves(run, run.curves)
    best = run.state.best
    if loop.val_loader is not None and restore_best(run.model, run.state):
        log.info(
            f"Restored the best epoch ({best['epoch']}, val acc {100 * best['val_acc']:.2f}%) for testing and saving"
        )
    if run.test_loader is None:
        return None
    keep = not loop.group.active  # the test probabilities, for results.json's ECE (one process holds them all)
    return reduce_metrics(
        evaluate(
            loop.module, run.test_loader, loop.device, loop.precision, names=loop.names, keep=keep, desc="Testing"
        ),
        loop.group,
    )


def _common_body(run: Run) -> dict:
    return {
        "config": run.cfg.to_dict(),
        "class_names": run.splits.class_names,
        "split": run.split,
        "frozen_fingerprint": run.fingerprint,
        "history": run.state.history,
        "best": run.state.best,
    }


def _last_body(run: Run) -> dict:
    loop = run.loop
    return {
        **_common_body(run),
        "kind": "last",
        "epoch": run.state.last_epoch,
        "model": trainable_state(run.model, loop.optimizer),
        "optimizer": loop.optimizer.state_dict(),
        "scheduler": loop.scheduler.state_dict(),
        "best_model": run.state.best_state,
        "rng": rng.capture(run.generator),
        "scaler": loop.scaler.state_dict() if loop.scaler else None,
    }


def _best_body(run: Run) -> dict:
    return {**_common_body(run), "kind": "best", "epoch": run.state.best["epoch"], "model": run.state.best_state}


def _write_metrics(history: list[dict], path: Path) -> None:
    save_csv(path, HISTORY_COLUMNS, ([row.get(column, "") for column in HISTORY_COLUMNS] for row in history))


def _draw_curves(run: Run, curves: _Curves) -> None:
    model = run.cfg.model
    title = f"{run.folder.name}: {model.arch}, {model.head} head"  # which run, when several sit side by side
    curves.draw(run.state.history, run.folder / "curves.png", run.state.best["epoch"], title)


class _Curves:
    """curves.png drawn on a thread of its own while the test split is scored and the weights are written
    (hashing, fsync and the rename leave the GIL free for matplotlib's import and drawing). Not when loader
    workers are forked after it (the test split's, calibration's): a fork while the thread holds an import
    lock would leave the worker waiting for it forever. ``wait`` returns once the file is in place; a
    picture that could not be drawn or written is a warning (the weights are saved by then, and metrics.csv
    holds the same numbers)."""

    def __init__(self, on_thread: bool):
        self.on_thread = on_thread
        self._drawn: Future | None = None
        self._path: Path | None = None

    def draw(self, history: list[dict], path: Path, best_epoch: int, title: str = "") -> None:
        from vggft.reporting.plots import save_curves

        self._path = path
        if self.on_thread:
            pool = ThreadPoolExecutor(1, thread_name_prefix="vggft-curves")
            self._drawn = pool.submit(save_curves, list(history), path, best_epoch, title)
            pool.shutdown(wait=False)  # the run goes on; wait() and settle() join the drawing
            return
        try:
            save_curves(history, path, best_epoch=best_epoch, title=title)
        except Exception as err:
            self._warn(err)

    def wait(self) -> None:
        if self._drawn is None:
            return
        try:
            self._drawn.result()
        except Exception as err:
            self._warn(err)
        self._drawn = None

    def settle(self) -> None:
        if self._drawn is not None:
            futures_wait([self._drawn])

    def _warn(self, err: Exception) -> None:
        said = (
            err
            if isinstance(err, OutputError)
            else f"{self._path}: not drawn ({type(err).__name__}: {first_line(err)})"
        )
        log.warning(f"{said}; metrics.csv beside it holds the same numbers")


# --- finish -----------------------------------------------------------------------------------------


def _finish(run: Run, test: Metrics | None, started: float) -> TrainResult:
    weights = Path(run.cfg.output.weights)
    sidecar = sidecar_path(weights)
    names = run.splits.class_names
    if not run.loop.group.is_main:
        return TrainResult(weights, sidecar, run.run_dir, names, run.state.history, test)
    if run.board:
        if run.curves is not None:
            run.curves.wait()
        run.board.close(run.state.history, test, run.state.best["epoch"], curves=run.folder / "curves.png")
    replaced = _way_back(weights, run.folder)
    fit, trust = _calibrate(run)
    save_trained(
        run.model,
        weights,
        run.cfg,
        names,
        split=run.split,
        temperature=fit.temperature if fit else None,
        trainable=trainable_state(run.model, run.loop.optimizer),
        frozen=run.fingerprint,
        trust=trust,
        precision=PRECISION[run.source.precision],
        metrics={
            "test": _sidecar_metrics(test),
            "history": run.state.history,
            "run": str(run.folder),
            "calibration": asdict(fit) if fit else None,
        },
    )
    if replaced is not None:
        log.info(f"Replaced the earlier {weights}{replaced}")
    if run.curves is not None:
        run.curves.wait()
    _write_results(run, test, weights, sidecar, time.monotonic() - started)
    return TrainResult(weights, sidecar, run.folder, names, run.state.history, test)


def _write_results(run: Run, test: Metrics | None, weights: Path, sidecar: Path, seconds: float) -> None:
    """results.json, the run folder's last file: test and best val figures, the weights saved and their digest.
    (The test ECE is uncalibrated, as eval's first figure; null under torchrun, where no process holds every
    test probability.)"""
    best = run.state.best
    row = next((r for r in run.state.history if r["epoch"] == best["epoch"]), {})
    best_val = {"epoch": best["epoch"], "accuracy": best["val_acc"], "loss": row.get("val_loss")}
    scores: dict | None = None
    if test is not None:
        scores = {
            "accuracy": test.accuracy,
            "loss": test.loss,
            "ece": expected_calibration_error(torch.cat(test.probabilities), torch.cat(test.labels))
            if test.logits
            else None,
            "images": test.total,
            "correct": test.correct,
        }
    save_results(
        run.folder,
        "train",
        seconds,
        run.cfg,
        classes=run.cfg.model.num_classes or len(run.splits.class_names),
        images={split: len(run.splits[split]) for split in ("train", "val", "test")},
        epochs=run.state.last_epoch,
        resumed=run.start > 1,  # seconds are then this command's alone
        best_val=best_val if run.loop.val_loader is not None else None,
        test=scores,
        weights=weights_record(weights, sidecar),
    )


SIDECAR_CONFUSION_MAX = 100  # classes whose confusion matrix the sidecar keeps (1,000 would be megabytes)


def _sidecar_metrics(test: Metrics | None) -> dict | None:
    if test is None:
        return None
    scores = test.to_dict()
    if len(test.class_names) > SIDECAR_CONFUSION_MAX:
        scores["confusion"] = None  # vggft eval --json gives it whole
    return scores


def _way_back(weights: Path, this_run: Path) -> str | None:
    """None if nothing is at ``weights`` (or this very run made it); else how to get the model about to be
    replaced back (its run's best.pt)."""
    if not weights.exists():
        return None
    try:
        run = json.loads(sidecar_path(weights).read_text(encoding="utf-8"))["metrics"]["run"]
    except (OSError, ValueError, KeyError, TypeError):
        return " (it had no vggft sidecar naming its run)"
    if Path(run).resolve() == this_run.resolve():  # a resumed run replaces its own earlier save
        return None
    best = Path(run) / "best.pt"
    return (
        f"; the run that made it, {run}, still holds it: vggft eval/predict/export --weights {best}"
        if best.is_file()
        else f" (its run folder {run} is gone)"
    )


def _calibrate(run: Run) -> tuple[TemperatureFit | None, TrustRecord | None]:
    """The softmax temperature that minimises the NLL on the whole val split (rank 0 alone, not its shard), and
    on the same val outputs the conformal thresholds and the novelty record (statistics from the train rows)."""
    loop = run.loop
    if not run.cfg.train.calibrate or loop.val_loader is None:
        return None, None
    val = loop.val_loader.dataset
    logits, labels, rows = _outputs(run, val.dataset if isinstance(val, Subset) else val, "Calibrating")
    fit = fit_temperature(logits, labels)
    log.info(
        f"Calibration: temperature {fit.temperature:.3f} fitted on {fit.count} val images "
        f"(val NLL {fit.nll_before:.4f} -> {fit.nll_after:.4f})"
    )
    if fit.at_bound:  # T -> 0 (val separable) or T -> infinity (no signal): no temperature beats that one
        log.warning(
            f"Calibration: temperature not stored: it ran to the edge of its range ({fit.temperature:.3g}) "
            f"because {fit.at_bound}; predict reports uncalibrated probabilities"
        )
    kept = fit if not fit.at_bound else None
    if loop.group.active:  # the train rows are sharded across the ranks, and rank 0 calibrates alone
        log.info("Conformal sets and novelty: not fitted under torchrun; vggft calibrate -w WEIGHTS fits them")
        return kept, None
    train = make_loader(
        run.source.dataset(run.splits["train"], desc="train"),
        run.cfg.data.eval_batch_size,
        device=loop.device,
        num_workers=run.source.loader_workers,
    )
    gathered = gather_penultimate(
        run.source.module, run.model, train, loop.device, loop.precision, len(loop.names), "Train rows"
    )
    return kept, fit_trust((logits, labels, rows), gathered, kept.temperature if kept else None)


def _outputs(run: Run, dataset: Dataset, desc: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, labels, penultimate rows) of every sample of ``dataset``, in eval mode."""
    loop = run.loop
    loader = make_loader(
        dataset, run.cfg.data.eval_batch_size, device=loop.device, num_workers=run.source.loader_workers
    )
    with penultimate_rows(run.model) as rows:
        kept = evaluate(run.source.module, loader, loop.device, loop.precision, names=loop.names, keep=True, desc=desc)
    return torch.cat(kept.logits), torch.cat(kept.labels), torch.cat(rows)
