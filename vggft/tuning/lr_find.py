"""``vggft lr-find``: the learning-rate range test on cached rows (Smith 2015; fastai's ``lr_find``).

A fresh head trains with the learning rate growing exponentially from ``start`` to ``end`` over ``steps``
batches (cycling through the train rows, or one pass over them), the loss smoothed by an exponential
moving average (beta 0.98, bias-corrected); the test stops once the smoothed loss exceeds 4x its minimum
(or is not finite). As fastai does, the first tenth of the steps and the last five are left out before
suggesting, and three suggestions are made:

- ``cliff`` (the default): a tenth of the lr at the cliff's edge, the last point before the smoothed loss
  climbs ``margin`` above its minimum: ``RISE`` (1 %) of it, or the raw loss's batch-to-batch noise
  (``RangeTest.jitter``) where that is larger; the last point read if it never does. It reads the one feature
  that a curve staying flat until the loss blows up has, where fastai's picks land in the flat stretch's
  noise (measured in docs/performance.md with scripts/lr_advice.py);
- ``valley``: the longest stretch over which the loss keeps falling (its longest decreasing subsequence),
  and the point about halfway along it (fastai's default, kept as the reference);
- ``steepest``: where the loss falls fastest against log(lr) (fastai's ``steep``).

When the curve gives no usable advice, no suggestion is made (``advice`` says why): the smoothed loss
neither fell nor climbed ``margin`` off its minimum over the steps read (nothing happened: the range or the
steps were too short), or it climbed from the first point read (``start`` was already too high).
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
SUGGESTIONS = ("cliff", "valley", "steepest")
# The smoothed loss has fallen (climbed) once it lies this fraction of its minimum, or one jitter, above that
# minimum somewhere before (after) it: see margin.
RISE = 0.01


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
        return lrs[self._read()], losses[self._read()]

    def jitter(self) -> float:
        """The batch-to-batch noise (standard deviation) of the raw loss over the steps read, from its second
        differences, which a steady fall or climb leaves alone: for noise of sd s, they have sd sqrt(6) s and
        their median size is 0.674 of that."""
        raw = torch.tensor(self.losses, dtype=torch.float64)[self._read()]
        second = raw[2:] - 2 * raw[1:-1] + raw[:-2]
        return float(second.abs().median()) / (0.674 * math.sqrt(6)) if len(second) else 0.0

    def _read(self) -> slice:
        finite = torch.isfinite(torch.tensor(self.smoothed, dtype=torch.float64))
        cut = int((~finite).nonzero()[0]) if not finite.all() else len(self.smoothed)
        return slice(self.planned // 10, max(cut - 5, 0))


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


def margin(losses: torch.Tensor, jitter: float = 0.0) -> float:
    """How far above its minimum the smoothed loss must be to count as having fallen or climbed: ``RISE`` of the
    minimum, or the raw loss's ``jitter`` (``RangeTest.jitter``) where that is larger."""
    return max(RISE * float(losses.min()), jitter)


def cliff(lrs: torch.Tensor, losses: torch.Tensor, jitter: float = 0.0) -> int:
    """Index of the cliff's edge: the last point before the loss first climbs ``margin`` above its minimum after
    it (the last point when it never does)."""
    low = int(losses.argmin())
    above = (losses[low:] > losses[low] + margin(losses, jitter)).nonzero()
    return low + int(above[0]) - 1 if len(above) else len(losses) - 1


def advice(lrs: torch.Tensor, losses: torch.Tensor, jitter: float = 0.0) -> str:
    """Why the curve gives no usable advice, or '' when it does."""
    low, by = int(losses.argmin()), margin(losses, jitter)
    floor = float(losses[low])
    fell, climbed = bool((losses[:low] > floor + by).any()), bool((losses[low:] > floor + by).any())
    if not fell and not climbed:
        return (
            f"the smoothed loss neither fell nor climbed (it stayed within {by:.2g} of {floor:.4g} from lr "
            f"{float(lrs[0]):.1e} to {float(lrs[-1]):.1e}); raise --end or --steps, or sweep train.lr instead"
        )
    if cliff(lrs, losses, jitter) == 0:
        return f"the smoothed loss climbed from the first lr read ({float(lrs[0]):.1e}) on; lower --start"
    return ""


def _trimmed(test: RangeTest) -> tuple[torch.Tensor, torch.Tensor]:
    lrs, losses = test.trimmed()
    if len(lrs) < 3:
        raise ConfigError(
            f"lr-find: only {len(test.lrs)} steps before the loss diverged ({test.stopped or 'too few steps'}), "
            "too few to suggest from; raise --steps, or lower --end"
        )
    return lrs, losses


def suggest(test: RangeTest) -> dict[str, tuple[float, float]]:
    """name -> (lr, smoothed loss there); empty when the curve gives no usable advice (see ``advice``)."""
    lrs, losses = _trimmed(test)
    if advice(lrs, losses, test.jitter()):
        return {}
    edge = cliff(lrs, losses, test.jitter())
    below = int((lrs.log() - math.log(float(lrs[edge]) / 10)).abs().argmin())  # the lr read nearest a tenth
    picks = {"valley": valley(lrs, losses), "steepest": steepest(lrs, losses)}
    return {
        "cliff": (float(lrs[edge]) / 10, float(losses[below])),
        **{name: (float(lrs[i]), float(losses[i])) for name, i in picks.items()},
    }


@dataclass
class LrFind:
    test: RangeTest
    suggestions: dict[str, tuple[float, float]]
    chosen: str
    run_dir: Path
    files: list[Path]
    advice: str = ""  # why the curve gives no usable advice (then no suggestions); '' when it does

    @property
    def lr(self) -> float | None:
        """The chosen suggestion; None when the curve gives no usable advice."""
        return self.suggestions[self.chosen][0] if self.suggestions else None


def lr_find(
    cfg: Config, *, start: float = 1e-7, end: float = 10.0, steps: int | None = 100, suggestion: str = "cliff"
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
    why = "" if suggestions else advice(*test.trimmed(), test.jitter())
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
    return LrFind(test, suggestions, suggestion, run_dir, [png, csv_path, run_dir / "config.yaml"], why)
