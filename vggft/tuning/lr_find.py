"""``vggft lr-find``: the learning-rate range test on cached rows (Smith 2015; fastai's ``lr_find``).

A fresh head trains with the learning rate growing exponentially from ``start`` to ``end`` over ``steps``
batches (cycling through the train rows, or one pass over them), the loss smoothed by an exponential
moving average (beta 0.98, bias-corrected); the test stops once the smoothed loss exceeds 4x its minimum
(or is not finite). As fastai does, the first tenth of the steps and the last five are left out before
suggesting, and two suggestions are made:

- ``valley``: the longest stretch over which the loss keeps falling (its longest decreasing subsequence),
  and the point about halfway along it (fastai's default);
- ``steepest``: where the loss falls fastest against log(lr).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from vggft.config.options import check_lr_find
from vggft.config.schema import Config
from vggft.data.loaders import make_loader
from vggft.features.rows import RowDataset
from vggft.model.build import set_train_mode
from vggft.training.loop import class_weights, cpu_threads, fresh_head, row_threads, to_device
from vggft.training.optim import make_optimizer
from vggft.training.train import check_run_folder, make_run_folder
from vggft.tuning.prepare import extract, prepare
from vggft.utils.errors import ConfigError
from vggft.utils.files import save_csv
from vggft.utils.logs import log, progress

BETA = 0.98
DIVERGED = 4.0
SUGGESTIONS = ("valley", "steepest")


@dataclass
class RangeTest:
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    planned: int = 0
    stopped: str = ""

    def trimmed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lrs, smoothed losses) the suggestions read: without the first tenth and the last five steps."""
        lrs, losses = torch.tensor(self.lrs, dtype=torch.float64), torch.tensor(self.smoothed, dtype=torch.float64)
        finite = torch.isfinite(losses)
        if not finite.all():
            cut = int((~finite).nonzero()[0])
            lrs, losses = lrs[:cut], losses[:cut]
        return lrs[self.planned // 10 : -5], losses[self.planned // 10 : -5]


def range_test(
    suffix: nn.Module,
    rows,
    labels: torch.Tensor,
    cfg: Config,
    *,
    names: list[str],
    device: torch.device,
    start: float,
    end: float,
    steps: int | None,
) -> RangeTest:
    """Train a fresh head with an exponentially growing lr; record each step's lr and (smoothed) loss."""
    seed = cfg.train.seed
    module = fresh_head(suffix, seed).to(device)
    set_train_mode(module)
    optimizer = make_optimizer(replace(cfg.train, lr=start), [p for p in module.parameters() if p.requires_grad])
    generator = torch.Generator().manual_seed(seed)
    loader = make_loader(
        RowDataset(rows, labels), cfg.data.batch_size, device=device, shuffle=True, generator=generator
    )
    steps = steps or len(loader)
    weights = class_weights(labels, len(names)).to(device) if cfg.data.balance == "weights" else None
    criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.train.label_smoothing)
    test = RangeTest(planned=steps)
    average, best = 0.0, math.inf
    with torch.random.fork_rng(devices=[]), cpu_threads(row_threads(device)):
        torch.manual_seed(seed)  # dropout
        for step, (inputs, targets) in enumerate(
            progress(_cycle(loader, steps), desc="lr-find", total=steps, unit="batch")
        ):
            lr = start * (end / start) ** (step / steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = criterion(module(to_device(inputs, device)), targets.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = loss.item()
            average = BETA * average + (1 - BETA) * value
            smooth = average / (1 - BETA ** (step + 1))
            test.lrs.append(lr)
            test.losses.append(value)
            test.smoothed.append(smooth)
            best = min(best, smooth)
            if not math.isfinite(smooth) or smooth > DIVERGED * best:
                test.stopped = f"stopped at step {step + 1} of {steps}: the loss diverged at lr {lr:.2e}"
                break
    return test


def _cycle(loader, steps: int):
    """``steps`` batches, going round the loader (a new shuffle each pass) as often as needed."""
    done = 0
    while done < steps:
        for batch in loader:
            yield batch
            done += 1
            if done == steps:
                return


def valley(lrs: torch.Tensor, losses: torch.Tensor) -> int:
    """Index about halfway along the longest decreasing run of the loss (fastai's ``valley``)."""
    n = len(losses)
    lds = torch.ones(n, dtype=torch.int64)  # longest decreasing subsequence ending at each point
    max_start = max_end = 0
    for i in range(1, n):
        higher = losses[:i] > losses[i]
        if higher.any():
            lds[i] = int(lds[:i][higher].max()) + 1
        if lds[i] > lds[max_end]:
            max_end = i
            max_start = max_end - int(lds[max_end])
    sections = (max_end - max_start) / 3
    return max(0, max_start + int(sections) + int(sections / 2))


def steepest(lrs: torch.Tensor, losses: torch.Tensor) -> int:
    """Index of the steepest fall of the loss against log(lr) (fastai's ``steep``)."""
    slopes = (losses[1:] - losses[:-1]) / (lrs[1:].log() - lrs[:-1].log())
    return int(slopes.argmin())


def suggest(test: RangeTest) -> dict[str, tuple[float, float]]:
    """name -> (lr, smoothed loss there)."""
    lrs, losses = test.trimmed()
    if len(lrs) < 3:
        raise ConfigError(
            f"lr-find: only {len(test.lrs)} steps before the loss diverged ({test.stopped or 'too few steps'}), "
            "too few to suggest from; raise --steps, or lower --end"
        )
    picks = {"valley": valley(lrs, losses), "steepest": steepest(lrs, losses)}
    return {name: (float(lrs[i]), float(losses[i])) for name, i in picks.items()}


@dataclass
class LrFind:
    test: RangeTest
    suggestions: dict[str, tuple[float, float]]
    chosen: str
    run_dir: Path
    files: list[Path]

    @property
    def lr(self) -> float:
        return self.suggestions[self.chosen][0]


def lr_find(
    cfg: Config, *, start: float = 1e-7, end: float = 10.0, steps: int | None = 100, suggestion: str = "valley"
) -> LrFind:
    """``vggft lr-find``: the range test on the train split's cached rows, its CSV and PNG in a run folder."""
    check_lr_find(start, end, steps)
    check_run_folder(cfg, "lr_find")
    if suggestion not in SUGGESTIONS:
        raise ConfigError(f"--suggest: expected one of {', '.join(SUGGESTIONS)}, got {suggestion!r}")
    data = prepare(cfg, "lr-find")
    rows, labels = extract(data, {"train": data.splits["train"]})["train"]
    test = range_test(
        data.suffix, rows, labels, cfg, names=data.names, device=data.device, start=start, end=end, steps=steps
    )
    if test.stopped:
        log.info(f"lr-find: {test.stopped}")
    suggestions = suggest(test)
    run_dir = make_run_folder(cfg, "lr_find")
    csv_path = save_csv(
        run_dir / "lr_find.csv",
        ["step", "lr", "loss", "smoothed_loss"],
        (
            [i + 1, f"{lr:.6e}", f"{loss:.6f}", f"{smooth:.6f}"]
            for i, (lr, loss, smooth) in enumerate(zip(test.lrs, test.losses, test.smoothed, strict=False))
        ),
    )
    from vggft.reporting.plots import save_lr_plot

    shown = slice(0, max(len(test.lrs) - 5, 2))  # fastai's plot leaves out the last five steps too
    png = save_lr_plot(
        test.lrs[shown], test.losses[shown], test.smoothed[shown], suggestions, suggestion, run_dir / "lr_find.png"
    )
    return LrFind(test, suggestions, suggestion, run_dir, [png, csv_path, run_dir / "config.yaml"])
