#!/usr/bin/env python
"""Benchmark: bf16 against fp32 training on the CPU, on a real data set (sklearn's digits), in one run.

Data (under --workdir): each digit's 8x8 images split 50/25/25 into train/val/test PNGs, per seed, served at
--image-size px. Every model is `vggft train` run as a subprocess, once with ``train.amp=off`` (fp32) and
once with ``train.amp=bf16``, same seed, interleaved so the machine's load hits both alike:

- scratch -- vgg11_bn from random init with every block unfrozen (``model.unfreeze=5``), Adam 1e-3 for all
             with a cosine schedule (without one, the last epoch's accuracy swung by 3 points between runs),
             --scratch-epochs epochs, batch 32: the seconds per epoch (train + val) and test accuracy;
- frozen  -- the same backbone frozen (random init: no pretrained file offline), classifier6 head, 30 epochs
             on the cached rows: the extraction's precision is the one that differs; test accuracy.

It prints one row per run, then per mode the fp32/bf16 time ratio and the mean and largest accuracy
difference over the seeds (issue 22: within 1 point; the scratch time ratio: 2x or more).

    python scripts/bench_digits.py                         # 3 seeds, 4 epochs (about 12 minutes on 2 cores)
    python scripts/bench_digits.py --seeds 0 --scratch-epochs 1 --modes scratch   # a smoke run
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_conformal import make_digits

MODES = {
    "scratch": ["model.unfreeze=5", "train.lr=1e-3", "train.backbone_lr=1e-3", "train.scheduler=cosine"]
    + ["data.batch_size=32"],
    "frozen": ["train.epochs=30", "train.lr=1e-3", "data.batch_size=32"],
}
PRECISIONS = {"fp32": "off", "bf16": "bf16"}


def train(root: Path, weights: Path, seed: int, mode: str, amp: str, args) -> dict:
    """`vggft train` in a subprocess; {"accuracy", "epoch_s", "wall_s"} from its run folder."""
    sets = [
        f"data.root={root}",
        "model.arch=vgg11_bn",
        "model.weights=null",
        "data.resize=null",
        f"data.image_size={args.image_size}",
    ]
    sets += ["train.optimizer=adam", f"train.seed={seed}", f"output.weights={weights}", f"train.amp={amp}"]
    sets += [f"output.runs_dir={weights.parent / 'runs'}", *MODES[mode]]
    if mode == "scratch":
        sets.append(f"train.epochs={args.scratch_epochs}")
    argv = [sys.executable, "-m", "vggft", "train", "-q", "--name", weights.stem]
    started = time.perf_counter()
    done = subprocess.run(argv + [a for s in sets for a in ("--set", s)], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"vggft train failed:\n{done.stderr[-3000:]}")
    run = weights.parent / "runs" / weights.stem
    results = json.loads((run / "results.json").read_text())
    with open(run / "metrics.csv", newline="") as f:
        seconds = [float(row["seconds"]) for row in csv.DictReader(f)]
    return {"accuracy": results["test"]["accuracy"], "epoch_s": statistics.mean(seconds), "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--scratch-epochs", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=32)
    args = parser.parse_args()
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="vggft-digits-"))).resolve()
    print(f"workdir {work}")
    print("| mode | seed | precision | test acc | s/epoch | wall s |")
    print("|---|---|---|---|---|---|")
    runs: dict = {}
    for seed in args.seeds:
        root = work / f"digits{seed}"
        if not root.exists():
            make_digits(root, seed, list(range(10)))
        for mode in args.modes:
            for name, amp in PRECISIONS.items():
                got = train(root, work / f"{mode}{seed}-{name}.pt", seed, mode, amp, args)
                runs[mode, seed, name] = got
                acc, epoch, wall = got["accuracy"], got["epoch_s"], got["wall_s"]
                print(f"| {mode} | {seed} | {name} | {acc:.3f} | {epoch:.1f} | {wall:.0f} |", flush=True)
    print("\n| mode | fp32 s/epoch | bf16 s/epoch | fp32/bf16 | acc diff (bf16 - fp32), mean | largest |")
    print("|---|---|---|---|---|---|")
    for mode in args.modes:
        fp32 = [runs[mode, s, "fp32"] for s in args.seeds]
        bf16 = [runs[mode, s, "bf16"] for s in args.seeds]
        t32, t16 = (statistics.mean(r["epoch_s"] for r in rs) for rs in (fp32, bf16))
        diffs = [b["accuracy"] - f["accuracy"] for f, b in zip(fp32, bf16, strict=True)]
        worst = max(diffs, key=abs)
        print(
            f"| {mode} | {t32:.1f} | {t16:.1f} | {t32 / t16:.2f}x | {100 * statistics.mean(diffs):+.1f} pt "
            f"| {100 * worst:+.1f} pt |"
        )


if __name__ == "__main__":
    main()
