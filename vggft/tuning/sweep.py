"""``vggft sweep``: many heads for the price of one extraction.

The frozen prefix runs once over train and val (``prepare.prepare``); every trial then trains a fresh
head on the cached rows in this process (``training.loop.fit_head``) and is scored on the val split. The test
split is never extracted, let alone used to choose. The run folder gets ``results.csv`` (one row per
trial), ``best.yaml`` (the winner's full config, for ``vggft train --config``) and ``sweep.png``; only
with ``save_best`` is a model written, the winning head inside the full network (a state_dict of the
whole VGG is hundreds of megabytes, so one per trial would be absurd).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import yaml

from vggft.config.schema import Config
from vggft.data import split_record
from vggft.model.weights import check_writable, save_trained, sidecar_path
from vggft.reporting.runs import save_results, weights_record
from vggft.training.loop import HeadFit, fit_head
from vggft.training.shared_steps import SharedSteps
from vggft.training.train import check_run_folder, make_run_folder
from vggft.tuning.prepare import PreparedData, extract, prepare, with_val_split
from vggft.tuning.sweep_plan import dotted, trial_configs
from vggft.utils.errors import DivergedError, Interrupted
from vggft.utils.files import remove_stale_temporaries, save_csv, save_text
from vggft.utils.logs import log, progress

RESULT_FILES = ("results.csv", "best.yaml", "sweep.png", "config.yaml")


@dataclass
class Trial:
    number: int
    values: dict[str, object]  # swept key -> the value it ran with
    cfg: Config
    val_acc: float = math.nan
    val_loss: float = math.nan
    epoch: int = 0
    seconds: float = 0.0
    status: str = "pending"  # ok, diverged

    @property
    def rank_key(self) -> tuple:
        """Best val accuracy first, then lower val loss, then the earlier trial; diverged ones last."""
        ok = self.status == "ok"
        return (not ok, -self.val_acc if ok else 0.0, self.val_loss if ok else 0.0, self.number)


@dataclass
class SweepResult:
    run_dir: Path
    trials: list[Trial]  # ranked, best first
    keys: list[str]
    files: list[Path] = field(default_factory=list)
    weights: Path | None = None

    @property
    def best(self) -> Trial:
        return self.trials[0]


def sweep(cfg: Config, plans: list[dict[str, str]], *, save_best: bool = False) -> SweepResult:
    """Train one head per planned trial on the cached rows; rank them on val; write the run folder."""
    started = time.monotonic()
    cfg = with_val_split(cfg, "sweep")
    configs = trial_configs(cfg, plans)  # every trial checked before any work
    keys = list(plans[0])
    trials = [Trial(n, {k: dotted(c, k) for k in keys}, c) for n, c in enumerate(configs, start=1)]
    if save_best:
        for trial in trials:
            check_writable(Path(trial.cfg.output.weights))
    check_run_folder(cfg, "sweep")
    data = prepare(cfg, "sweep")
    pairs = extract(data, {"train": data.splits["train"], "val": data.splits["val"]})
    run_dir = make_run_folder(cfg, "sweep")
    _remove_stale_temporaries(run_dir.parent)
    result = SweepResult(run_dir, trials, keys)
    try:
        _trials_and_files(data, pairs, result, save_best)
        best = {"trial": result.best.number, "values": result.best.values, "epoch": result.best.epoch}
        best.update(val_acc=result.best.val_acc, val_loss=result.best.val_loss)
        saved = weights_record(result.weights, sidecar_path(result.weights)) if result.weights else None
        save_results(run_dir, "sweep", time.monotonic() - started, cfg, trials=len(trials), best=best, weights=saved)
    except KeyboardInterrupt:
        raise Interrupted(_interrupted_line(result, data)) from None
    return result


def _trials_and_files(data: PreparedData, pairs: dict, result: SweepResult, save_best: bool) -> None:
    """Every trial, then the run folder's files (and the best trial's model with ``save_best``)."""
    best_state = _run_trials(data, pairs, result)
    result.trials = sorted(result.trials, key=lambda t: t.rank_key)
    result.files = [_write_results(result, ranked=True)]
    if result.best.status != "ok":
        raise DivergedError(f"sweep: every trial diverged (see {result.files[0]}); lower train.lr (or its range)")
    result.files += [_write_best_yaml(result), _plot(result), result.run_dir / "config.yaml"]
    if save_best:
        result.weights = _save_best(data, result, best_state)


def _remove_stale_temporaries(runs_dir: Path) -> None:
    """The temporary folders that killed commands left in the run folders (a sweep's run folder is never
    written again, so the writes into it would not find them): removed as ``atomic_path`` removes its own."""
    try:
        folders = [entry.path for entry in os.scandir(runs_dir) if entry.is_dir(follow_symlinks=False)]
    except OSError:
        return
    for folder in folders:
        remove_stale_temporaries(Path(folder))


def _interrupted_line(result: SweepResult, data: PreparedData) -> str:
    """Ctrl-C: what results.csv holds, the best trial so far, and how to go on."""
    total, csv = len(result.trials), result.run_dir / "results.csv"
    done = [t for t in result.trials if t.status != "pending"]
    again = f"run the same vggft sweep command again for all {total} trials"
    if data.source.cache is not None and data.source.cache.writable:
        again += " (the features are cached: it goes straight to the trials)"
    if not done:
        return f"Interrupted during trial 1 of {total}: no trial ended, so {csv} is not written; {again}"
    ok = sorted((t for t in done if t.status == "ok"), key=lambda t: t.rank_key)
    values = ", ".join(f"{k}={_show(v)}" for k, v in ok[0].values.items()) if ok else ""
    best = f"best so far trial {ok[0].number} ({values}), val acc {100 * ok[0].val_acc:.2f}%" if ok else "all diverged"
    if len(done) == total:
        return f"Interrupted after all {total} trials, writing the run folder: {csv} holds them ({best}); {again}"
    return f"Interrupted after {len(done)} of {total} trials: {csv} holds their results ({best}); {again}"


def _run_trials(data: PreparedData, pairs: dict, result: SweepResult) -> dict[str, torch.Tensor]:
    """Every trial in turn, results.csv rewritten after each; returns the best trial's trainable state."""
    best_state: dict[str, torch.Tensor] = {}
    best: Trial | None = None
    total = len(result.trials)
    steps = SharedSteps(data.suffix)
    for trial in progress(result.trials, desc="Trials", unit="trial"):  # the results: the caller's table
        values = ", ".join(f"{k}={_show(v)}" for k, v in trial.values.items())
        try:
            fit = fit_head(
                data.suffix, pairs["train"], pairs["val"], trial.cfg.train, data.fit_options(trial.cfg), steps=steps
            )
        except DivergedError as err:
            trial.status = "diverged"
            log.warning(f"Trial {trial.number}/{total} ({values}): diverged ({str(err).split(';')[0]})")
        else:
            _record(trial, fit)
            if best is None or trial.rank_key < best.rank_key:
                best, best_state = trial, _trainable_state(fit)
        _write_results(result, ranked=False)
    if steps.taken:
        log.debug(
            f"The head's frozen layers ran {steps.computed} training steps for the trials and lent "
            f"{steps.taken} more from them ({steps.bytes / 2**20:.0f} MiB kept)"
        )
    return best_state


def _record(trial: Trial, fit: HeadFit) -> None:
    row = next(r for r in fit.history if r["epoch"] == fit.best["epoch"])
    trial.val_acc, trial.val_loss, trial.epoch = row["val_acc"], row["val_loss"], row["epoch"]
    trial.seconds, trial.status = fit.seconds, "ok"


def _trainable_state(fit: HeadFit) -> dict[str, torch.Tensor]:
    trainable = {name for name, p in fit.module.named_parameters() if p.requires_grad}
    return {k: v.detach().clone() for k, v in fit.module.state_dict().items() if k in trainable}


def _show(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _write_results(result: SweepResult, *, ranked: bool) -> Path:
    done = [t for t in result.trials if t.status != "pending"]
    order = sorted(done, key=lambda t: t.rank_key) if ranked else done
    header = ["rank", "trial", *result.keys, "val_acc", "val_loss", "epoch", "seconds", "status"]
    rows = [
        [
            rank if ranked else "",
            t.number,
            *t.values.values(),
            f"{t.val_acc:.6f}",
            f"{t.val_loss:.6f}",
            t.epoch,
            f"{t.seconds:.2f}",
            t.status,
        ]
        for rank, t in enumerate(order, start=1)
    ]
    return save_csv(result.run_dir / "results.csv", header, rows)


def _write_best_yaml(result: SweepResult) -> Path:
    best = result.best
    config = replace(best.cfg, output=replace(best.cfg.output, name=None)).to_dict()
    path = result.run_dir / "best.yaml"
    values = ", ".join(f"{k}={_show(v)}" for k, v in best.values.items())
    header = (
        f"# vggft sweep {result.run_dir}: trial {best.number} of {len(result.trials)} ({values}),\n"
        f"# val acc {100 * best.val_acc:.2f}% at epoch {best.epoch}. Train it: vggft train --config {path}\n"
    )
    save_text(header + yaml.safe_dump(config, sort_keys=False), path)
    return path


def _plot(result: SweepResult) -> Path:
    from vggft.reporting.plots import save_sweep_plot

    trials = sorted(result.trials, key=lambda t: t.number)
    return save_sweep_plot(trials, result.keys, result.best.number, result.run_dir / "sweep.png")


def _save_best(data: PreparedData, result: SweepResult, state: dict[str, torch.Tensor]) -> Path:
    """The winning head put into the network (the suffix shares its layers) and saved with its sidecar."""
    best = result.best
    data.suffix.load_state_dict(state, strict=False)
    weights = Path(best.cfg.output.weights)
    split = split_record(data.splits, best.cfg.data) if data.splits.layout == "pool" else None
    metrics = {
        "val": {"accuracy": best.val_acc, "loss": best.val_loss, "epoch": best.epoch},
        "sweep": {"run": str(result.run_dir), "trial": best.number},
    }
    save_trained(data.model, weights, best.cfg, data.splits.class_names, split=split, metrics=metrics)
    log.info(f"Saved the best trial's head ({best.number}) in {weights} (sidecar {sidecar_path(weights)})")
    return weights
