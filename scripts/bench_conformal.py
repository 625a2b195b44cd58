#!/usr/bin/env python
"""Benchmark: conformal prediction sets and novelty scores of `vggft train` models on sklearn's digits.

Data (under --workdir): each digit's images split 50/25/25 into train/val/test as PNGs (8x8 grey, squashed
to --image-size px: ``data.resize: null``; under the default resize 256 a 32 px crop kept the middle 1/8 of
each side). Models: vgg11_bn from random init (`model.weights: null`), `vggft train` with a val split, run
as a subprocess; then the saved weights are run in-process over every image (logits and the penultimate
rows, the input of the head's last Linear).

- coverage (all 10 digits, --seeds, the model --coverage-strength): conformal sets fitted on val (what
  `vggft train` stores in the sidecar), scored on test for alpha 0.1 and 0.05: empirical coverage and mean
  set size per score (lac, aps); with MAPIE installed (`pip install mapie`, not a project dependency), its
  LAC sets on the same probabilities are compared set for set.
- novelty (digits 0-4 in, test images of 5-9 out): AUROC and FPR at 95 % TPR of msp, energy and Mahalanobis
  on the penultimate rows (full width and projected to 16/64/256 dims), for each model of --strengths.

    # docs/performance.md's tables (about 15 minutes on 2 CPU cores)
    python scripts/bench_conformal.py --coverage-strength scratch4 --strengths scratch1 scratch6 head30 head1
    python scripts/bench_conformal.py --only novelty --strengths head1
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from vggft.model.conformal import fit_conformal, level_key, prediction_sets, set_coverage
from vggft.model.inference import image_loader, load_model
from vggft.model.novelty import (
    auroc,
    energy_score,
    fit_gaussian,
    fpr_at_tpr,
    mahalanobis_score,
    msp_score,
    penultimate_rows,
)

# Every block from random init (vgg11_bn), batch 32, Adam 1e-3 for all.
SCRATCH = ["train.lr=1e-3", "train.backbone_lr=1e-3", "model.unfreeze=5", "data.batch_size=32"]
STRENGTHS = {  # name -> --set options on top of the common ones
    "head30": ["train.epochs=30", "train.lr=1e-3"],  # head alone on the random backbone's cached rows
    "head1": ["train.epochs=1", "train.lr=1e-5"],  # barely trained
    "scratch6": ["train.epochs=6", *SCRATCH],  # well trained
    "scratch4": ["train.epochs=4", *SCRATCH],
    "scratch1": ["train.epochs=1", *SCRATCH],  # badly trained
}


def make_digits(root: Path, seed: int, classes: list[int]) -> None:
    import numpy as np
    from PIL import Image

    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("needs scikit-learn for load_digits: pip install scikit-learn")
    digits, rng = load_digits(), random.Random(seed)
    for label in range(10):
        indices = [i for i, t in enumerate(digits.target.tolist()) if t == label]
        rng.shuffle(indices)
        n = len(indices)
        parts = {"train": indices[: n // 2], "val": indices[n // 2 : 3 * n // 4], "test": indices[3 * n // 4 :]}
        for split, chosen in parts.items():
            if label not in classes and split != "test":
                continue
            folder = root / (split if label in classes else "out") / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8), "L").save(folder / f"d{i:04d}.png")


def train(root: Path, weights: Path, seed: int, strength: str, size: int) -> None:
    sets = [
        f"data.root={root}",
        "model.arch=vgg11_bn",
        "model.weights=null",
        "data.resize=null",
        f"data.image_size={size}",
    ]
    sets += ["train.optimizer=adam", f"train.seed={seed}", f"output.weights={weights}"]
    sets += [f"output.runs_dir={weights.parent / 'runs'}", *STRENGTHS[strength]]
    argv = [sys.executable, "-m", "vggft", "train", "-q", "--name", weights.stem]
    done = subprocess.run(argv + [a for s in sets for a in ("--set", s)], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"vggft train failed:\n{done.stderr[-3000:]}")


@torch.inference_mode()
def outputs(weights: Path, folder: Path, names: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, penultimate rows, labels) of every image under folder/<class>/ (label -1: not a trained class)."""
    trained = load_model(weights)
    paths = sorted(str(p) for p in folder.rglob("*.png"))
    labels = torch.tensor([names.index(Path(p).parent.name) if Path(p).parent.name in names else -1 for p in paths])
    trained.model.eval()
    logits = []
    with penultimate_rows(trained.model) as rows:
        for images, _ in image_loader(paths, trained.cfg.data, 64, torch.device("cpu")):
            logits.append(trained.model(images).float())
    return torch.cat(logits), torch.cat(rows), labels


def temperature_of(weights: Path) -> float | None:
    return load_model(weights).temperature


def coverage_rows(weights: Path, root: Path, names: list[str]) -> list[list]:
    """Per score and alpha: (score, alpha, coverage, mean size, empty sets, MAPIE agreement)."""
    t = temperature_of(weights)
    val_logits, _, val_labels = outputs(weights, root / "val", names)
    test_logits, _, test_labels = outputs(weights, root / "test", names)
    val_p = torch.softmax(val_logits.double() / (t or 1.0), 1)
    test_p = torch.softmax(test_logits.double() / (t or 1.0), 1)
    accuracy = float((test_p.argmax(1) == test_labels).double().mean())
    table = []
    for method in ("lac", "aps"):
        fitted = fit_conformal(val_p, val_labels, method)
        for alpha in (0.1, 0.05):
            q = fitted["thresholds"][level_key(1 - alpha)]
            sets = prediction_sets(test_p, q, method)
            cov = set_coverage(sets, test_labels, names)
            agree = mapie_agreement(val_p, val_labels, test_p, alpha, sets) if method == "lac" else "-"
            table.append([method, alpha, cov["coverage"], cov["mean_size"], cov["empty"], agree, accuracy])
    return table


def mapie_agreement(val_p, val_labels, test_p, alpha: float, sets: list[list[int]]) -> str:
    """Share of test images whose set equals MAPIE's LAC set on the same probabilities ('n/a': no MAPIE)."""
    try:
        import numpy as np
        from mapie.conformity_scores import LACConformityScore
    except ImportError:
        return "n/a"
    score = LACConformityScore()
    y = val_labels.numpy()
    conformity = score.get_conformity_scores(y, val_p.numpy(), y_enc=y)
    quantile = score.get_conformity_score_quantiles(conformity, np.array([alpha]), None)
    mine = torch.zeros_like(test_p, dtype=torch.bool)
    for row, chosen in enumerate(sets):
        mine[row, chosen] = True
    theirs = torch.from_numpy(1 - test_p.numpy() <= quantile[0])
    return f"{float((mine == theirs).all(1).double().mean()):.3f}"


def novelty_rows(weights: Path, root: Path, names: list[str]) -> list[list]:
    t = temperature_of(weights)
    train_logits, train_rows, train_labels = outputs(weights, root / "train", names)
    in_logits, in_rows, in_labels = outputs(weights, root / "test", names)
    out_logits, out_rows, _ = outputs(weights, root / "out", names)
    accuracy = float((in_logits.argmax(1) == in_labels).double().mean())
    scores = {
        "msp": (msp_score(in_logits, t), msp_score(out_logits, t)),
        "energy": (energy_score(in_logits, t), energy_score(out_logits, t)),
    }
    for dims in (16, 64, 256, train_rows.shape[1]):
        stats = fit_gaussian(train_rows, train_labels, len(names), dims)
        scores[f"mahalanobis {dims}-d"] = (mahalanobis_score(in_rows, stats), mahalanobis_score(out_rows, stats))
    return [[name, accuracy, auroc(a, b), fpr_at_tpr(a, b)] for name, (a, b) in scores.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--strengths", nargs="+", default=["head30", "head1"], choices=list(STRENGTHS))
    parser.add_argument("--coverage-strength", default="head30", choices=list(STRENGTHS))
    parser.add_argument("--only", choices=["coverage", "novelty"])
    parser.add_argument("--image-size", type=int, default=32)
    args = parser.parse_args()
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="vggft-conformal-"))).resolve()
    print(f"workdir {work}")
    if args.only != "novelty":
        print(f"coverage: {args.coverage_strength}")
        print("| seed | model acc | score | alpha | test coverage | mean set size | empty sets | same sets as MAPIE |")
        print("|---|---|---|---|---|---|---|---|")
        for seed in args.seeds:
            root, weights = work / f"digits{seed}", work / f"cov{seed}-{args.coverage_strength}.pt"
            make_digits(root, seed, list(range(10)))
            train(root, weights, seed, args.coverage_strength, args.image_size)
            for method, alpha, cov, size, empty, agree, acc in coverage_rows(
                weights, root, [str(d) for d in range(10)]
            ):
                print(f"| {seed} | {acc:.3f} | {method} | {alpha} | {cov:.3f} | {size:.2f} | {empty} | {agree} |")
    if args.only != "coverage":
        root = work / "digits04"
        make_digits(root, 0, [0, 1, 2, 3, 4])
        print("| model | test acc (0-4) | score | AUROC | FPR at 95 % TPR |")
        print("|---|---|---|---|---|")
        for strength in args.strengths:
            weights = work / f"ood-{strength}.pt"
            train(root, weights, 0, strength, args.image_size)
            for name, acc, area, fpr in novelty_rows(weights, root, [str(d) for d in range(5)]):
                print(f"| {strength} | {acc:.3f} | {name} | {area:.3f} | {fpr:.3f} |")


if __name__ == "__main__":
    main()
