#!/usr/bin/env python
"""Measure: how far lr-find's suggestions land from the learning rate a sweep finds best, on real data.

sklearn's digits (1797 8x8 images, 10 classes) written as a pool of 32 px PNGs, split 70/20/10 (val 20 %); a
frozen random vgg11 (``model.weights: null``, nothing downloaded), batch 32, 5 epochs. For each head and
optimizer:

- the lr-find range test (``vggft.tuning.lr_find.range_test``, lr-find's defaults: 1e-7 to 10, 100 steps)
  once per seed;
- a sweep (``vggft.tuning.sweep.sweep``) over train.lr 1e-5 ... 1 in half decades, every lr once per seed,
  scored by the mean val accuracy over the seeds;

then every candidate rule reads the same curves, and two tables say where each lands against the sweep's
best lr (the ratio; within 10x or not) and the sweep's mean val accuracy at the swept lr nearest it. fastai's
``valley`` (vggft's default before ``cliff``) is the reference, measured in the same run. About 10 minutes on
2 CPU cores; ``--workdir`` keeps the data, the feature cache and the results, and ``--reuse`` reads them
back (``--steps`` then runs only the new range tests). The results are in docs/performance.md.

    pip install scikit-learn                              # for the data set only (not a vggft dependency)
    python scripts/lr_advice.py --workdir /tmp/lr-advice  # sgd and adam, classifier6 and gap, seeds 0 1 2
    python scripts/lr_advice.py --workdir /tmp/lr-advice --reuse --steps 300
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from vggft.config.loading import load_config
from vggft.tuning import lr_find as lf
from vggft.tuning.prepare import extract, prepare
from vggft.tuning.sweep import sweep
from vggft.utils.logs import configure

SWEEP = ("1e-5", "3e-5", "1e-4", "3e-4", "1e-3", "3e-3", "1e-2", "3e-2", "1e-1", "3e-1", "1")


def write_digits(root: Path) -> Path:
    """sklearn's digits as root/digits/<0..9>/<i>.png, 32 px RGB (bilinear upscale of the 8x8 images)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("scripts/lr_advice.py needs scikit-learn for the digits data set: pip install scikit-learn")
    from PIL import Image

    pool = root / "digits"
    if pool.exists():
        return pool
    digits = load_digits()
    for index, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        path = pool / str(label) / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = (image * (255 / 16)).round().astype("uint8")
        Image.fromarray(pixels).resize((32, 32), Image.BILINEAR).convert("RGB").save(path)
    return pool


def config(work: Path, pool: Path, head: str, optimizer: str, seed: int = 0):
    sets = [
        f"data.root={pool}",
        "data.image_size=32",
        "data.resize=null",
        "data.split=[0.7,0.2,0.1]",  # val 20 %
        "model.arch=vgg11",
        "model.weights=null",
        f"model.head={head}",
        f"train.optimizer={optimizer}",
        "train.epochs=5",
        "data.batch_size=32",
        f"train.seed={seed}",
        "train.calibrate=false",
        f"cache.dir={work / 'cache'}",
        f"output.runs_dir={work / 'runs'}",
    ]
    return load_config(None, sets)


def range_tests(cfg, seeds: list[int], steps: int) -> list[dict]:
    """The lr-find range test (1e-7 to 10, as the CLI's defaults) once per seed, on one extraction."""
    data = prepare(cfg, "lr-find")
    rows, labels = extract(data, {"train": data.splits["train"]})["train"]
    curves = []
    for seed in seeds:
        seeded = load_config(None, [f"train.seed={seed}"], base=cfg.to_dict())
        test = lf.range_test(
            data.suffix, rows, labels, seeded, names=data.names, device=data.device, start=1e-7, end=10.0, steps=steps
        )
        curves.append({"seed": seed, "lrs": test.lrs, "losses": test.losses, "smoothed": test.smoothed})
    return curves


def sweep_accuracy(cfg, seeds: list[int]) -> dict[str, float]:
    """train.lr -> val accuracy averaged over the seeds (a diverged trial counts as 0)."""
    plans = [{"train.lr": lr, "train.seed": str(seed)} for lr in SWEEP for seed in seeds]
    result = sweep(cfg, plans)
    acc: dict[str, list[float]] = {lr: [] for lr in SWEEP}
    for trial in result.trials:
        lr = SWEEP[[float(v) for v in SWEEP].index(trial.values["train.lr"])]
        acc[lr].append(trial.val_acc if trial.status == "ok" else 0.0)
    return {lr: statistics.mean(values) for lr, values in acc.items()}


# --- candidate rules: each reads a range test's curve as lr-find does (``trimmed``) and returns an lr, or None
# where it gives no advice.


def at(pick):
    """An index rule (vggft's valley, steepest) as an lr rule."""

    def rule(test: lf.RangeTest) -> float:
        lrs, losses = test.trimmed()
        return float(lrs[pick(lrs, losses)])

    return rule


def minimum(test: lf.RangeTest) -> float:
    """fastai's ``minimum``: a tenth of the lr at the lowest smoothed loss."""
    lrs, losses = test.trimmed()
    return float(lrs[int(losses.argmin())]) / 10


def slide(test: lf.RangeTest, lr_diff: int = 15, thresh: float = 0.005) -> float:
    """fastai's ``slide``: walking left from the end until the loss's gradient over ``lr_diff`` points settles."""
    lrs, losses = test.trimmed()
    grad = torch.gradient(losses)[0]
    right, left = len(losses) - 1, len(losses) - 1 - lr_diff
    pick = float(lrs[max(left, 0)])
    while left >= 0 and abs(float(grad[right] - grad[left])) > thresh:
        pick = float(lrs[left])
        right, left = right - 1, left - 1
    return pick


def before_minimum(pick):
    """An index rule read on the stretch up to the lowest loss only."""

    def rule(test: lf.RangeTest) -> float:
        lrs, losses = test.trimmed()
        end = int(losses.argmin()) + 1
        return float(lrs[pick(lrs[:end], losses[:end])]) if end >= 3 else float(lrs[0])

    return rule


def fallen(fraction: float):
    """The first lr where the loss has fallen ``fraction`` of the way from its first point read to its minimum."""

    def rule(test: lf.RangeTest) -> float:
        lrs, losses = test.trimmed()
        target = losses[0] - fraction * (losses[0] - losses.min())
        return float(lrs[int((losses <= target).nonzero()[0])])

    return rule


def cliff(rise: float, divide: float, jitter: bool = True):
    """vggft's ``cliff`` with another threshold and divisor (or without the jitter floor); None where it gives
    no advice."""

    def rule(test: lf.RangeTest) -> float | None:
        lrs, losses = test.trimmed()
        noise = test.jitter() if jitter else 0.0
        saved, lf.RISE = lf.RISE, rise
        try:
            return None if lf.advice(lrs, losses, noise) else float(lrs[lf.cliff(lrs, losses, noise)]) / divide
        finally:
            lf.RISE = saved

    return rule


REFERENCE = "valley (fastai's default; vggft's before)"
RULES = {
    REFERENCE: at(lf.valley),
    "steepest (fastai's steep)": at(lf.steepest),
    "minimum (fastai's: argmin / 10)": minimum,
    "slide (fastai's)": slide,
    "valley before the minimum": before_minimum(lf.valley),
    "steepest before the minimum": before_minimum(lf.steepest),
    "fallen half way to the minimum": fallen(0.5),
    "cliff: rise 1 % or the jitter, / 10 (vggft's default)": cliff(0.01, 10),
    "cliff: rise 1 % (no jitter floor), / 10": cliff(0.01, 10, jitter=False),
    "cliff: rise 1 % or the jitter, / 3": cliff(0.01, 3),
    "cliff: rise 0.5 % or the jitter, / 10": cliff(0.005, 10),
    "cliff: rise 2 % or the jitter, / 10": cliff(0.02, 10),
}


def advise(curve: dict, steps: int) -> dict[str, float | None]:
    test = lf.RangeTest(lrs=curve["lrs"], losses=curve["losses"], smoothed=curve["smoothed"], planned=steps)
    return {name: rule(test) for name, rule in RULES.items()}  # type: ignore[operator]


def nearest(lr: float) -> str:
    return min(SWEEP, key=lambda s: abs(math.log10(float(s)) - math.log10(lr)))


def report(results: dict, steps: int) -> None:
    """The sweeps, the detailed table (every head, optimizer and rule; one value per seed), one line per rule."""
    print(f"| head | optimizer | {' | '.join(SWEEP)} |\n|---|---|{'---:|' * len(SWEEP)}")
    for key, found in results.items():
        accuracies = " | ".join(f"{found['sweep'][lr]:.0%}" for lr in SWEEP)
        print(f"| {key.replace('/', ' | ')} | {accuracies} |")
    print("\n| head | optimizer | rule | suggested lr | sweep's best | ratio | within 10x | val acc there |")
    print("|---|---|---|---|---|---|---|---|")
    summary: dict[str, list] = {name: [] for name in RULES}
    for key, found in results.items():
        acc = found["sweep"]
        best = max(SWEEP, key=lambda lr: acc[lr])
        advice = [advise(curve, steps) for curve in found["curves"]]
        for name in RULES:
            picks = [a[name] for a in advice]
            ratios = [None if p is None else p / float(best) for p in picks]
            within = [r is not None and abs(math.log10(r)) <= 1 for r in ratios]
            there = [None if p is None else acc[nearest(p)] for p in picks]
            summary[name] += [(key, w, t, acc[best]) for w, t in zip(within, there, strict=True)]
            print(
                f"| {key.replace('/', ' | ')} | {name} | {_each(picks, '{:.2g}')} | {best} ({acc[best]:.0%}) "
                f"| {_each(ratios, '{:.2g}')} | {sum(within)}/{len(picks)} | {_each(there, '{:.0%}')} |"
            )
    print(
        "\n| rule | within 10x of the sweep's best | no advice | mean val acc there | the sweep's best there "
        f"| vs the reference ({REFERENCE.split()[0]}) there |\n|---|---|---|---|---|---|"
    )
    for name, rows in summary.items():
        advised = [(i, row) for i, row in enumerate(rows) if row[2] is not None]
        if not advised:
            print(f"| {name} | - | {len(rows)} | - | - | - |")
            continue
        hits = sum(row[1] for _, row in advised)
        mean = statistics.mean(row[2] for _, row in advised)
        best_acc = statistics.mean(row[3] for _, row in advised)
        versus = statistics.mean(row[2] - summary[REFERENCE][i][2] for i, row in advised)
        print(
            f"| {name} | {hits}/{len(advised)} | {len(rows) - len(advised)} | {mean:.0%} | {best_acc:.0%} "
            f"| {100 * versus:+.0f} points |"
        )


def _each(values: list, form: str) -> str:
    return ", ".join("none" if v is None else form.format(v) for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizers", default="sgd,adam")
    parser.add_argument("--heads", default="classifier6,gap")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=100, help="range-test steps (lr-find's default: 100)")
    parser.add_argument("--workdir", type=Path, default=None, help="kept between runs: data, cache, results.json")
    parser.add_argument("--reuse", action="store_true", help="reuse the sweeps and curves --workdir holds")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vggft-lr-advice-"))
    saved = work / "results.json"  # head/optimizer -> sweep and curves-<steps>, kept for the next run
    results = json.loads(saved.read_text()) if saved.exists() and args.reuse else {}
    configure(verbose=False, progress=False)
    pool = write_digits(work)
    seeds = [int(s) for s in args.seeds.split(",")]
    started, curves = time.perf_counter(), f"curves-{args.steps}"
    for head in args.heads.split(","):
        for optimizer in args.optimizers.split(","):
            cfg = config(work, pool, head, optimizer)
            found = results.setdefault(f"{head}/{optimizer}", {})
            if curves not in found:
                found[curves] = range_tests(cfg, seeds, args.steps)
            if "sweep" not in found:
                found["sweep"] = sweep_accuracy(cfg, seeds)
            saved.write_text(json.dumps(results))
    print(f"digits in {work}, {time.perf_counter() - started:.0f}s; torch {torch.__version__}; {args.steps} steps\n")
    wanted = {f"{h}/{o}" for h in args.heads.split(",") for o in args.optimizers.split(",")}
    results = {k: {"sweep": v["sweep"], "curves": v[curves]} for k, v in results.items() if k in wanted}
    report(results, args.steps)


if __name__ == "__main__":
    main()
