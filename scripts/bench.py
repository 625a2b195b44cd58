#!/usr/bin/env python
"""Benchmark: the PyTorch tutorial's loop against `vggft train`, same data, same weights, one run.

Generates N JPEGs of about 500x375 (two classes), then times, each in its own process:

1. bare      -- a bare channels_last `features` forward in inference mode on random tensors (the ceiling);
2. reference -- a faithful copy of the tutorial's loop (batch 4, num_workers=0, full forward every epoch);
3. cold      -- `vggft train` with an empty feature cache;
4. warm      -- `vggft train` again, cache warm (no backbone forward at all).

It prints images/s, wall seconds, peak memory, accuracies and the ratios to the reference. Then, each
timed as the median of --repeat rounds in the same session (each round runs every command once):

5. floor    -- `python -c "import torch, torchvision"`, what any run pays before it starts;
6. warm     -- `vggft train` on a warm cache again, against the floor (target: 1.6x at most);
7. sweep    -- `vggft sweep`, 8 trials on the warm cache, against one warm train (target: 2x at most);
8. kfold    -- `vggft kfold --folds 5` on the warm cache, against one warm train (target: 3x at most).

With --memory 2000,20000 it also writes that many 64 px images (weights null, classifier6 rows of 16 KiB),
extracts them, and reports the peak RSS of a warm `vggft train` at each size: the growth between the
sizes against the bytes of the rows added (target: 1.2x at most; the rows are read through memory maps).
Weights: torchvision's IMAGENET1K_V1 file if $TORCH_HOME has it, else a seeded random vgg16
saved under that name in a temporary $TORCH_HOME (both sides load the same file either way).

    python scripts/bench.py                       # 100 train + 50 test, 5 epochs (about 7 min on 2 cores)
    python scripts/bench.py --train 16 --test 8 --epochs 2 --image-size 64   # a quick smoke run
    python scripts/bench.py --no-reference --memory 2000,20000    # floor, sweep, kfold and memory only
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HUB_FILE = "vgg16-397923af.pth"


def make_jpegs(root: Path, train: int, test: int, seed: int = 0, size: tuple[int, int] = (500, 375)) -> None:
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    width, height = size
    scale = width / 500
    for split, count in (("train", train), ("test", test)):
        for index in range(count):
            kind = ("cat", "dog")[index % 2]
            base = (190, 120, 60) if kind == "cat" else (60, 110, 190)
            colour = tuple(max(0, min(255, c + rng.randint(-40, 40))) for c in base)
            image = Image.effect_noise(size, 60).convert("RGB")
            image = Image.blend(image, Image.new("RGB", size, colour), 0.7)
            draw = ImageDraw.Draw(image)
            for _ in range(6):
                x, y = rng.randrange(width), rng.randrange(height)
                r = max(2, round(rng.randint(20, 90) * scale))
                (draw.ellipse if kind == "cat" else draw.rectangle)(
                    (x - r, y - r, x + r, y + r), fill=tuple(255 - c for c in colour)
                )
            path = root / split / kind / f"{kind}.{index}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path, quality=90)


def ensure_weights(torch_home: Path) -> str:
    target = torch_home / "hub" / "checkpoints" / HUB_FILE
    if target.is_file():
        return f"{target} (existing file)"
    import torch
    from torchvision.models import vgg16

    target.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(vgg16().state_dict(), target)
    return f"{target} (seeded random stand-in for IMAGENET1K_V1)"


# --- the children: each prints one JSON line ---------------------------------------------------


def child_setup(args) -> dict:
    import torch

    machine = (
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"cuda {'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}"
    )
    return {"weights": ensure_weights(Path(args.data)), "machine": machine}


def child_bare(args) -> dict:
    import torch
    from torchvision.models import vgg16

    model = vgg16().features.eval().to(memory_format=torch.channels_last)
    batch = torch.randn(args.batch, 3, args.image_size, args.image_size).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        model(batch)  # warm-up
        count, started = 0, time.perf_counter()
        while count < args.count:
            model(batch)
            count += len(batch)
    seconds = time.perf_counter() - started
    return {"images": count, "seconds": seconds, "images_per_s": count / seconds}


def child_reference(args) -> dict:
    """The tutorial's code, as printed, with only paths and sizes filled in."""
    import torch
    from torch import nn, optim
    from torch.utils.data import DataLoader
    from torchvision import models, transforms
    from torchvision.datasets import ImageFolder
    from tqdm import tqdm

    started = time.perf_counter()
    torch.manual_seed(0)
    hyperparams = {
        "batch_size": 4,
        "learning_rate": 1e-4,
        "epochs": args.epochs,
        "transform": transforms.Compose(
            [
                transforms.Resize(args.resize),
                transforms.CenterCrop(args.image_size),
                transforms.ToTensor(),
                transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
            ]
        ),
    }
    train_dataset = ImageFolder(root=Path(args.data) / "train", transform=hyperparams["transform"])
    test_dataset = ImageFolder(root=Path(args.data) / "test", transform=hyperparams["transform"])
    train_dataloader = DataLoader(train_dataset, batch_size=hyperparams["batch_size"], shuffle=True, drop_last=True)
    test_dataloader = DataLoader(test_dataset, batch_size=hyperparams["batch_size"], shuffle=True, drop_last=True)
    model = models.vgg16(weights="VGG16_Weights.IMAGENET1K_V1")
    for param in model.parameters():
        param.requires_grad = False
    model.classifier[6] = nn.Linear(4096, len(train_dataset.classes))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    criterion = nn.CrossEntropyLoss().to(device)
    optimizer = optim.SGD(model.parameters(), lr=hyperparams["learning_rate"])
    forwards = 0
    for epoch in range(hyperparams["epochs"]):
        cost = 0.0
        for images, classes in tqdm(train_dataloader, desc=f"Epoch {epoch + 1}", disable=True):
            images, classes = images.to(device), classes.to(device)
            output = model(images)
            loss = criterion(output, classes)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            cost += loss
            forwards += len(images)
    with torch.no_grad():
        model.eval()
        accuracy = 0.0
        for images, classes in test_dataloader:
            images, classes = images.to(device), classes.to(device)
            outputs_classes = torch.argmax(torch.softmax(model(images), dim=-1), dim=-1)
            accuracy += int(torch.eq(classes, outputs_classes).sum())
            forwards += len(images)
    scored = len(test_dataloader) * hyperparams["batch_size"]
    return {
        "seconds": time.perf_counter() - started,
        "forwards": forwards,
        "accuracy": accuracy / scored,
        "scored": scored,
    }


def run_child(argv: list[str], env: dict) -> tuple[dict | str, float, float]:
    """(its JSON line, or its stdout; wall seconds; the child's own peak RSS in MiB)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # wait4: this child's rusage, not all children's
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        sys.exit(f"child failed: {' '.join(argv)}\n{stderr[-3000:]}")
    peak = usage.ru_maxrss / 1024
    try:
        return json.loads(stdout.strip().splitlines()[-1]), wall, peak
    except (ValueError, IndexError):
        return stdout + stderr, wall, peak  # vggft's result on stdout, its notes on stderr


def main() -> None:
    args = parse_args()
    if args.child:
        children = {"bare": child_bare, "reference": child_reference, "setup": child_setup}
        print(json.dumps(children[args.child](args)))
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vggft-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    torch_home = Path(os.environ.get("TORCH_HOME", work / "torch_home"))
    env = {**os.environ, "TORCH_HOME": str(torch_home), "VGGFT_CACHE": str(work / "cache")}
    data = work / "data"
    if not data.exists():
        make_jpegs(data, args.train, args.test)
    # torch stays out of this process: a child's peak RSS (wait4's ru_maxrss) counts what it was forked with.
    setup, _, _ = run_child([sys.executable, __file__, "--child", "setup", "--data", str(torch_home)], env)
    print(f"data: {data} ({args.train} train + {args.test} test JPEGs, 500x375); weights: {setup['weights']}")
    print(f"machine: {setup['machine']}")
    sets = [
        "--set",
        f"data.root={data}",
        "--set",
        f"data.image_size={args.image_size}",
        "--set",
        f"data.resize={args.resize}",
        "--set",
        f"train.epochs={args.epochs}",
        "--set",
        f"output.weights={work / 'models' / 'VGG16.pt'}",
    ]
    vggft = [sys.executable, "-m", "vggft"]
    cold, cold_wall, cold_peak = run_child([*vggft, "train", "-q", *sets], env)
    print(f"vggft cold: {cold_wall:.1f}s wall")
    if not args.no_reference:
        tutorial_phase(args, data, env, (cold, cold_wall, cold_peak), [*vggft, "train", "-q", *sets])
    if not args.no_tune:
        tune_phase(args, env, vggft, sets)
    if args.memory:
        memory_phase(args, work, env, vggft, [int(n) for n in args.memory.split(",")])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=100)
    parser.add_argument("--test", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--resize", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--no-reference", action="store_true", help="Skip the tutorial loop and the bare forward.")
    parser.add_argument("--no-tune", action="store_true", help="Skip the floor, warm, sweep and kfold timings.")
    parser.add_argument("--repeat", type=int, default=3, help="Runs per timing in the tune phase (the median).")
    parser.add_argument("--memory", default="", help="Image counts for the memory phase, e.g. 2000,20000.")
    parser.add_argument("--child", choices=["bare", "reference", "setup"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=64, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.resize = args.resize or round(args.image_size * 256 / 224)
    return args


def extraction_rate(log: str) -> tuple[float, int]:
    images = seconds = 0.0
    for line in log.splitlines():
        if line.startswith("Extracting") and " images in " in line:
            count, rest = line.split(": ", 1)[1].split(" images in ")
            images += int(count)
            seconds += float(rest.split("s ")[0])
    return (images / seconds if seconds else float("nan")), int(images)


def test_accuracy(log: str) -> str:
    return next((line.split("Test: ")[1] for line in log.splitlines() if line.startswith("Test: ")), "?")


def tutorial_phase(args, data: Path, env: dict, cold_run: tuple, train: list[str]) -> None:
    """The tutorial's loop against vggft train (cold, then warm), and extraction against a bare forward."""
    me = [
        sys.executable,
        __file__,
        "--image-size",
        str(args.image_size),
        "--resize",
        str(args.resize),
        "--epochs",
        str(args.epochs),
        "--data",
        str(data),
    ]
    bare, _, _ = run_child(me + ["--child", "bare"], env)
    print(f"bare features forward: {bare['images_per_s']:.2f} img/s")
    ref, ref_wall, ref_peak = run_child(me + ["--child", "reference"], env)
    print(f"reference: {ref_wall:.1f}s wall, acc {100 * ref['accuracy']:.2f}% of {ref['scored']}")
    cold, cold_wall, cold_peak = cold_run
    warm, warm_wall, warm_peak = run_child(train, env)
    print(f"vggft warm: {warm_wall:.1f}s wall")
    rate, extracted = extraction_rate(cold)
    total = ref["forwards"]
    images = args.train + args.test
    rows = [
        (
            "reference (tutorial loop)",
            ref_wall,
            total / ref_wall,
            ref_peak,
            f"{100 * ref['accuracy']:.2f}% (drop_last: {ref['scored']} of {args.test})",
            1.0,
        ),
        (
            "vggft train, cold cache",
            cold_wall,
            images / cold_wall,
            cold_peak,
            test_accuracy(cold),
            ref_wall / cold_wall,
        ),
        (
            "vggft train, warm cache",
            warm_wall,
            images / warm_wall,
            warm_peak,
            test_accuracy(warm),
            ref_wall / warm_wall,
        ),
    ]
    print()
    print("| run | wall s | images/s | peak RSS MiB | test accuracy | speed-up |")
    print("|---|---:|---:|---:|---|---:|")
    for name, wall, ips, peak, acc, ratio in rows:
        print(f"| {name} | {wall:.1f} | {ips:.2f} | {peak:.0f} | {acc} | {ratio:.2f}x |")
    print()
    print(
        f"cold extraction: {rate:.2f} img/s over {extracted} images; bare features forward: "
        f"{bare['images_per_s']:.2f} img/s; ratio {rate / bare['images_per_s']:.2f}"
    )
    print(
        f"(reference images/s counts its {total} forwards: {args.epochs} epochs x {args.train} train "
        f"+ {args.test} test, less drop_last; vggft's counts each image once)"
    )


def tune_phase(args, env: dict, vggft: list[str], sets: list[str]) -> None:
    """The interpreter floor, a warm train, an 8-trial sweep and a 5-fold kfold, all on the warm cache."""
    runs = {
        "floor: python -c 'import torch, torchvision'": [sys.executable, "-c", "import torch, torchvision"],
        "vggft train, warm cache": [*vggft, "train", "-q", *sets],
        "vggft sweep, 8 trials, warm cache": [
            *vggft,
            "sweep",
            "-q",
            *sets,
            "--grid",
            "train.lr=1e-5,1e-4,1e-3,1e-2",
            "--grid",
            "train.weight_decay=0,1e-4",
        ],
        "vggft kfold --folds 5, warm cache": [*vggft, "kfold", "-q", "--folds", "5", *sets],
    }
    # Round after round, each command once per round: a drift of the machine (another job, the disk still
    # writing back the previous run's 537 MB) reaches every command alike, not the ones timed last.
    times: dict[str, list[float]] = {name: [] for name in runs}
    peaks: dict[str, float] = dict.fromkeys(runs, 0.0)
    for _ in range(args.repeat):
        for name, argv in runs.items():
            _, wall, peak = run_child(argv, env)
            times[name].append(wall)
            peaks[name] = max(peaks[name], peak)
    walls = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        print(
            f"{name}: {walls[name]:.1f}s wall (median of {args.repeat}: {', '.join(f'{v:.1f}' for v in values)}), "
            f"peak RSS {peaks[name]:.0f} MiB"
        )
    floor, warm, sweep, kfold = walls.values()
    print()
    print(f"| run | wall s (median of {args.repeat}) | ratio | against | target |")
    print("|---|---:|---:|---|---:|")
    against_rows = [("", floor, ""), ("floor", floor, "1.6x"), ("warm train", warm, "2x"), ("warm train", warm, "3x")]
    for (name, wall), (against, base, target) in zip(walls.items(), against_rows, strict=True):
        ratio = f"{wall / base:.2f}x" if against else ""
        print(f"| {name} | {wall:.1f} | {ratio} | {against} | {target} |")


def memory_phase(args, work: Path, env: dict, vggft: list[str], sizes: list[int]) -> None:
    """Peak RSS of a warm train at each size: how it grows against the bytes of the rows it reads."""
    width = 4096  # classifier6 rows: float32 outputs of classifier[1]
    peaks = {}
    for count in sizes:
        data = work / f"small{count}"
        test = count // 10
        if not data.exists():
            make_jpegs(data, count - test, test, seed=count, size=(64, 64))
        sets = [
            "--set",
            f"data.root={data}",
            "--set",
            "data.image_size=64",
            "--set",
            "data.resize=null",
            "--set",
            "model.weights=null",
            "--set",
            "train.epochs=1",
            "--set",
            "data.batch_size=64",
            "--set",
            "data.eval_batch_size=64",
            "--set",
            f"output.weights={work / 'models' / f'small{count}.pt'}",
        ]
        sized = {**env, "VGGFT_CACHE": str(work / f"cache{count}")}
        cold, cold_wall, cold_peak = run_child([*vggft, "train", "-q", *sets], sized)
        _, warm_wall, peaks[count] = run_child([*vggft, "train", "-q", *sets], sized)
        rate, _ = extraction_rate(cold)
        print(
            f"{count} images of 64 px: rows {count * width * 4 / 2**20:.0f} MiB; cold {cold_wall:.0f}s "
            f"({rate:.1f} img/s extraction), peak RSS {cold_peak:.0f} MiB; warm {warm_wall:.1f}s, peak RSS "
            f"{peaks[count]:.0f} MiB"
        )
    print()
    print("| images (64 px, classifier6) | rows MiB | warm train peak RSS MiB |")
    print("|---:|---:|---:|")
    for count in sizes:
        print(f"| {count} | {count * width * 4 / 2**20:.0f} | {peaks[count]:.0f} |")
    if len(sizes) > 1:
        small, large = min(sizes), max(sizes)
        rows = (large - small) * width * 4 / 2**20
        growth = peaks[large] - peaks[small]
        print(f"growth {growth:.0f} MiB for {rows:.0f} MiB more rows: {growth / rows:.2f}x (target: 1.2x at most)")


if __name__ == "__main__":
    main()
