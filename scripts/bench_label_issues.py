#!/usr/bin/env python
"""Benchmark: how many deliberately wrong labels `vggft label-issues` finds, and how many it accuses wrongly.

Generates demo-style pictures of three classes (warm round "sun", cool square "sea", green pointed
"leaf"; noise, random sizes and places, as `vggft make-demo`), moves a seeded 10 % of them into another
class's folder, runs the real `vggft label-issues` on the folder (a random-init VGG-16: `model.weights:
null`, nothing downloaded), and scores its CSV against the planted flips:

- precision: flagged files that were flipped / flagged files;
- recall: flipped files flagged / flipped files.

For comparison it scores the plain rule "out-of-fold prediction differs from the label" on the same
out-of-fold probabilities (oof.csv).

    python scripts/bench_label_issues.py                       # 3 x 100 images, 10 % flipped, both heads
    python scripts/bench_label_issues.py --per-class 200 --noise 0.2 --heads gap
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("leaf", "sea", "sun")


def picture(kind: str, rng: random.Random, size: int) -> Image.Image:
    """One demo-style picture: a background and 1-3 shapes of the class's colours and form."""
    if kind == "sun":
        background = (rng.randint(150, 255), rng.randint(80, 170), rng.randint(0, 80))
        ink = (255, rng.randint(200, 255), rng.randint(0, 120))
    elif kind == "sea":
        background = (rng.randint(0, 80), rng.randint(60, 150), rng.randint(150, 255))
        ink = (rng.randint(200, 255), rng.randint(200, 255), 255)
    else:
        background = (rng.randint(20, 90), rng.randint(110, 200), rng.randint(20, 90))
        ink = (rng.randint(180, 255), rng.randint(200, 255), rng.randint(60, 140))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 3)):
        r = rng.randint(size // 8, size // 3)
        x, y = rng.randint(0, size - 1), rng.randint(0, size - 1)
        if kind == "sun":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=ink)
        elif kind == "sea":
            draw.rectangle((x - r, y - r, x + r, y + r), fill=ink)
        else:
            draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=ink)
    noise = Image.effect_noise((size, size), rng.randint(20, 50)).convert("RGB")
    return Image.blend(image, noise, 0.15).filter(ImageFilter.GaussianBlur(rng.random()))


def make_noisy_folder(root: Path, per_class: int, noise: float, seed: int, size: int = 64) -> set[Path]:
    """root/train/<class>/*.jpg (and a small test/), a ``noise`` fraction of train in a wrong class folder;
    returns the flipped files (where they lie now)."""
    rng = random.Random(seed)
    files = []
    for kind in CLASSES:
        for index in range(per_class):
            files.append((kind, f"{kind}.{index:04d}.jpg"))
        for index in range(max(2, per_class // 10)):
            path = root / "test" / kind / f"{kind}.{index:04d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            picture(kind, rng, size).save(path, quality=90)
    flipped_indices = set(rng.sample(range(len(files)), round(noise * len(files))))
    flipped = set()
    for index, (kind, name) in enumerate(files):
        folder = kind
        if index in flipped_indices:
            folder = rng.choice([c for c in CLASSES if c != kind])
        path = root / "train" / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        picture(kind, rng, size).save(path, quality=90)
        if index in flipped_indices:
            flipped.add(path.resolve())
    return flipped


def score(flagged: set[Path], flipped: set[Path]) -> tuple[float, float, int]:
    hits = len(flagged & flipped)
    return (hits / len(flagged) if flagged else float("nan")), hits / len(flipped), hits


def run(root: Path, out: Path, head: str, args, env: dict) -> tuple[float, str]:
    sets = [
        f"data.root={root}",
        "data.image_size=64",
        "data.resize=null",
        "model.weights=null",
        f"model.head={head}",
        "train.optimizer=adam",
        f"train.lr={args.lr}",
        f"train.epochs={args.epochs}",
        "data.batch_size=16",
        f"train.seed={args.seed}",
    ]
    argv = [
        sys.executable,
        "-m",
        "vggft",
        "label-issues",
        "--quiet",
        "--folds",
        str(args.folds),
        "--out",
        str(out),
        *[a for s in sets for a in ("--set", s)],
    ]
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"label-issues failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - started, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--heads", default="gap,classifier6")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vggft-label-issues-"))
    root = work / "noisy"
    flipped = make_noisy_folder(root, args.per_class, args.noise, args.seed)
    total = args.per_class * len(CLASSES)
    print(
        f"data: {root}: {total} train images of {len(CLASSES)} classes, {len(flipped)} labels flipped "
        f"({100 * args.noise:.0f} %); random-init vgg16, 64 px, {args.folds} folds, {args.epochs} epochs, "
        f"adam lr {args.lr}"
    )
    env = {**os.environ, "VGGFT_CACHE": str(work / "cache")}
    print()
    print("| head | method | flagged | true flips among them | precision | recall | out-of-fold acc | seconds |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for head in args.heads.split(","):
        out = work / f"out-{head}"
        seconds, stdout = run(root, out, head, args, env)
        with open(out / "label_issues.csv", newline="") as handle:
            flagged = {Path(r["path"]).resolve() for r in csv.DictReader(handle)}
        with open(out / "oof.csv", newline="") as handle:
            oof = list(csv.DictReader(handle))
        predicted = {Path(r["path"]).resolve() for r in oof if max(CLASSES, key=lambda c: float(r[c])) != r["label"]}
        accuracy = 1 - len(predicted) / len(oof)
        for method, found in (("confident learning", flagged), ("prediction != label", predicted)):
            precision, recall, hits = score(found, flipped)
            print(
                f"| {head} | {method} | {len(found)} | {hits} | {100 * precision:.1f}% | {100 * recall:.1f}% "
                f"| {100 * accuracy:.1f}% | {seconds:.0f} |"
            )


if __name__ == "__main__":
    main()
