#!/usr/bin/env python
"""Benchmark: when is the model behind `vggft label-issues` too weak to judge labels?

Runs the real `vggft label-issues --folds 5` over models of a range of strengths (random-init VGG backbones,
`model.weights: null`, nothing downloaded; strength varied with model.arch, model.head, data.image_size,
train.optimizer, train.lr and train.epochs) on two data sets with a seeded share of labels flipped (0 %,
5 %, 10 % by default), and scores its label_issues.csv and oof.csv:

- OOF acc: out-of-fold acc@1 against the given (partly flipped) labels;
- flagged share: flagged images / images;
- precision: flagged images that were planted flips / flagged images (0 % noise: every flag is wrong);
- recall: planted flips flagged / planted flips.

Data (written under --workdir as root/train/<class>/ plus a small clean root/test/):
- digits: sklearn's load_digits (8x8 grey, 10 classes), --digits-per-class images of each class as PNGs
  (`pip install scikit-learn` if missing: not a project dependency);
- shapes: the demo-style sun/sea/leaf pictures of scripts/bench_label_issues.py (64 px), which a random
  backbone separates well.

Flips are nested (the 5 % set is part of the 10 % set) and made by renaming files into a wrong class folder
between noise levels, so the feature cache (keyed by path and file identity) re-extracts only the moved
images. Then, for candidate rules "stop when OOF acc < floor" (0.5, 0.6, 0.7, 0.8), "stop when flagged share
> ceiling" (0.1, 0.15, 0.2, 0.3) and either of the two, it prints which share of the runs with planted flips
and precision < 50 % each rule catches, which share of the good runs (precision >= 50 %) it wrongly stops,
and which share of the clean (0 %) runs it stops. Chance (1/classes) and the majority-class share of each
data set are printed too. About 12-15 minutes on 2 CPU cores.

    python scripts/bench_label_weak.py                          # everything, temp workdir
    python scripts/bench_label_weak.py --noise 0 --only digits   # a quick look at the strengths
    python scripts/bench_label_weak.py --workdir /tmp/lw         # keep the data, cache and CSVs there
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
FLOORS = (0.5, 0.6, 0.7, 0.8)
CEILINGS = (0.1, 0.15, 0.2, 0.3)


@dataclass(frozen=True)
class Setting:
    data: str
    name: str
    sets: tuple[str, ...]


def _s(data: str, arch: str, head: str, size: int, optimizer: str, lr: float, epochs: int) -> Setting:
    sets = (
        f"model.arch={arch}",
        f"model.head={head}",
        f"data.image_size={size}",
        f"train.optimizer={optimizer}",
        f"train.lr={lr}",
        f"train.epochs={epochs}",
    )
    return Setting(data, f"{arch} {head} {size}px {optimizer} lr {lr:g} x{epochs}", sets)


# Weakest to strongest (roughly) per data set; settings sharing arch/head/size share one feature extraction.
SETTINGS = (
    _s("digits", "vgg16", "gap", 32, "sgd", 1e-4, 2),
    _s("digits", "vgg16", "gap", 32, "adam", 1e-4, 5),
    _s("digits", "vgg16", "gap", 32, "adam", 1e-3, 3),
    _s("digits", "vgg16", "gap", 32, "adam", 1e-3, 5),
    _s("digits", "vgg16", "gap", 32, "adam", 3e-4, 10),
    _s("digits", "vgg16", "gap", 32, "adam", 1e-3, 20),
    _s("digits", "vgg11", "classifier6", 32, "adam", 1e-4, 10),
    _s("digits", "vgg11", "gap", 48, "adam", 1e-3, 30),
    _s("shapes", "vgg16", "gap", 32, "sgd", 1e-4, 2),
    _s("shapes", "vgg16", "gap", 32, "adam", 1e-3, 2),
    _s("shapes", "vgg16", "gap", 32, "adam", 3e-4, 10),
    _s("shapes", "vgg16", "gap", 32, "adam", 1e-3, 4),
    _s("shapes", "vgg16", "gap", 32, "adam", 1e-3, 10),
    _s("shapes", "vgg11", "gap", 64, "adam", 1e-3, 10),
)


def _bench_label_issues():
    spec = importlib.util.spec_from_file_location("bench_label_issues", HERE / "bench_label_issues.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_digits(root: Path, per_class: int, seed: int) -> list[tuple[Path, str]]:
    """root/train/<digit>/*.png (per_class of each digit) and root/test/<digit>/ (5 each); the train files."""
    import numpy as np
    from PIL import Image

    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("needs scikit-learn for load_digits: pip install scikit-learn")
    digits = load_digits()
    rng = random.Random(seed)
    files = []
    for label in sorted(set(digits.target.tolist())):
        indices = [i for i, t in enumerate(digits.target.tolist()) if t == label]
        rng.shuffle(indices)
        if len(indices) < per_class + 5:
            sys.exit(f"--digits-per-class {per_class}: digit {label} has only {len(indices)} images")
        for split, chosen in (("train", indices[:per_class]), ("test", indices[per_class : per_class + 5])):
            for i in chosen:
                path = root / split / str(label) / f"digit{i:04d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8), "L").save(path)
                if split == "train":
                    files.append((path, str(label)))
    return files


def make_shapes(root: Path, per_class: int, seed: int) -> list[tuple[Path, str]]:
    """The sun/sea/leaf pictures of bench_label_issues.py, none flipped yet; the train files."""
    bench = _bench_label_issues()
    bench.make_noisy_folder(root, per_class, 0.0, seed)
    return [(p, p.parent.name) for kind in bench.CLASSES for p in sorted((root / "train" / kind).glob("*.jpg"))]


class Flips:
    """Seeded, nested label flips: the first round(noise * n) files of a fixed order lie in a wrong class
    folder, the rest in their own; ``apply`` renames only what differs from the current state."""

    def __init__(self, root: Path, files: list[tuple[Path, str]], seed: int):
        rng = random.Random(f"flips/{seed}")
        self.classes = sorted({label for _, label in files})
        self.files = list(files)
        rng.shuffle(self.files)
        self.wrong = [rng.choice([c for c in self.classes if c != label]) for _, label in self.files]
        self.root = root
        self.moved = 0

    def _place(self, index: int, flipped: bool) -> tuple[Path, Path]:
        path, label = self.files[index]
        other = path.parent.parent / self.wrong[index] / path.name
        return (path, other) if flipped else (other, path)

    def apply(self, noise: float) -> set[Path]:
        count = round(noise * len(self.files))
        for index in range(len(self.files)):
            source, target = self._place(index, index < count)
            if source.exists() and not target.exists():
                source.rename(target)
        self.moved = count
        return {self._place(i, True)[1].resolve() for i in range(count)}


def run(setting: Setting, root: Path, out: Path, args, env: dict) -> float:
    sets = [
        f"data.root={root}",
        "data.resize=null",
        "model.weights=null",
        "data.batch_size=32",
        f"train.seed={args.seed}",
        *setting.sets,
    ]
    argv = [sys.executable, "-m", "vggft", "label-issues", "--quiet", "--show", "0", "--folds", str(args.folds)]
    argv += ["--out", str(out), *[a for s in sets for a in ("--set", s)]]
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"label-issues failed ({done.returncode}):\n{' '.join(argv)}\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


@dataclass
class Result:
    setting: Setting
    noise: float
    images: int
    accuracy: float
    flagged: int
    hits: int
    flips: int
    seconds: float

    @property
    def share(self) -> float:
        return self.flagged / self.images

    @property
    def precision(self) -> float:
        return self.hits / self.flagged if self.flagged else math.nan

    @property
    def recall(self) -> float:
        return self.hits / self.flips if self.flips else math.nan


def score(setting: Setting, noise: float, out: Path, flipped: set[Path], seconds: float) -> Result:
    with open(out / "label_issues.csv", newline="") as handle:
        flagged = {Path(r["path"]).resolve() for r in csv.DictReader(handle)}
    with open(out / "oof.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        names = reader.fieldnames[3:]
        oof = list(reader)
    correct = sum(max(names, key=lambda c: float(r[c])) == r["label"] for r in oof)
    scored = {Path(r["path"]).resolve() for r in oof}
    flips = flipped & scored
    return Result(setting, noise, len(oof), correct / len(oof), len(flagged), len(flagged & flips), len(flips), seconds)


def pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.1f}%"


def rule_rows(results: list[Result]) -> list[str]:
    """Per candidate rule: bad runs caught, good runs wrongly stopped, clean runs stopped."""
    planted = [r for r in results if r.noise > 0 and r.flagged]
    bad = [r for r in planted if r.precision < 0.5]
    good = [r for r in planted if r.precision >= 0.5]
    clean = [r for r in results if r.noise == 0]
    rules = [(f"OOF acc < {f:g}", lambda r, f=f: r.accuracy < f) for f in FLOORS]
    rules += [(f"flagged share > {c:g}", lambda r, c=c: r.share > c) for c in CEILINGS]
    rules += [
        (f"acc < {f:g} or share > {c:g}", lambda r, f=f, c=c: r.accuracy < f or r.share > c)
        for f in FLOORS
        for c in CEILINGS
    ]

    def share(rule, runs) -> str:
        stopped = sum(rule(r) for r in runs)
        return f"{stopped}/{len(runs)} ({100 * stopped / len(runs):.0f}%)" if runs else "n/a"

    lines = [
        f"Runs with planted flips: {len(bad)} with precision < 50 % (bad), {len(good)} with precision >= 50 % "
        f"(good); {len(clean)} clean runs (0 % flipped: every flag is a false accusation).",
        "",
        "| rule (stop when) | bad runs caught | good runs wrongly stopped | clean runs stopped |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {name} | {share(rule, bad)} | {share(rule, good)} | {share(rule, clean)} |" for name, rule in rules]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--noise", default="0,0.05,0.1", help="flipped shares, comma-separated")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--digits-per-class", type=int, default=90)
    parser.add_argument("--shapes-per-class", type=int, default=100)
    parser.add_argument("--only", default="digits,shapes", help="data sets, comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="vggft-label-weak-"))).resolve()
    env = {**os.environ, "VGGFT_CACHE": str(work / "cache")}
    wanted = args.only.split(",")
    makers = {"digits": (make_digits, args.digits_per_class), "shapes": (make_shapes, args.shapes_per_class)}
    flips = {}
    for data in wanted:
        root = work / data
        if root.exists():
            sys.exit(f"{root} exists: give a fresh --workdir")
        make, per_class = makers[data]
        files = make(root, per_class, args.seed)
        flips[data] = Flips(root, files, args.seed)
        counts = {}
        for _, label in files:
            counts[label] = counts.get(label, 0) + 1
        print(
            f"{data}: {len(files)} train images, {len(counts)} classes; chance {100 / len(counts):.1f}%, "
            f"majority class {100 * max(counts.values()) / len(files):.1f}% (before flips)"
        )
    print(f"workdir {work}; {args.folds} folds, random-init backbones (model.weights null), batch 32, CPU")
    print()
    print("| data | model setting | flipped | OOF acc | flagged | flagged share | precision | recall | seconds |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    results = []
    for noise in sorted(float(n) for n in args.noise.split(",")):
        for data in wanted:
            flipped = flips[data].apply(noise)
            for number, setting in enumerate(s for s in SETTINGS if s.data == data):
                out = work / "out" / f"{data}-{number:02d}-noise{noise:g}"
                seconds = run(setting, work / data, out, args, env)
                r = score(setting, noise, out, flipped, seconds)
                results.append(r)
                print(
                    f"| {data} | {setting.name} | {100 * noise:.0f}% | {100 * r.accuracy:.1f}% | {r.flagged} "
                    f"| {100 * r.share:.1f}% | {pct(r.precision)} | {pct(r.recall)} | {seconds:.0f} |",
                    flush=True,
                )
    print()
    for line in rule_rows(results):
        print(line)
    print()
    print(f"Total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
