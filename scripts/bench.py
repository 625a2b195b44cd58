#!/usr/bin/env python
"""Benchmark: the PyTorch tutorial's loop against `vggft train`, same data, same weights, one run.

Generates N JPEGs of about 500x375 (two classes), then times, each in its own process:

1. bare      -- a bare channels_last `features` forward in inference mode on random tensors (the ceiling);
2. reference -- a faithful copy of the tutorial's loop (batch 4, num_workers=0, full forward every epoch);
3. cold      -- `vggft train` with an empty feature cache;
4. warm      -- `vggft train` again, cache warm (no backbone forward at all).

It prints images/s, wall seconds, peak memory, accuracies and the ratios to the reference.
Weights: torchvision's IMAGENET1K_V1 file if $TORCH_HOME has it, else a seeded random vgg16
saved under that name in a temporary $TORCH_HOME (both sides load the same file either way).

    python scripts/bench.py                       # 100 train + 50 test, 5 epochs (about 7 min on 2 cores)
    python scripts/bench.py --train 16 --test 8 --epochs 2 --image-size 64   # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HUB_FILE = "vgg16-397923af.pth"


def make_jpegs(root: Path, train: int, test: int, seed: int = 0) -> None:
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    for split, count in (("train", train), ("test", test)):
        for index in range(count):
            kind = ("cat", "dog")[index % 2]
            base = (190, 120, 60) if kind == "cat" else (60, 110, 190)
            colour = tuple(max(0, min(255, c + rng.randint(-40, 40))) for c in base)
            image = Image.effect_noise((500, 375), 60).convert("RGB")
            image = Image.blend(image, Image.new("RGB", (500, 375), colour), 0.7)
            draw = ImageDraw.Draw(image)
            for _ in range(6):
                x, y, r = rng.randrange(500), rng.randrange(375), rng.randint(20, 90)
                (draw.ellipse if kind == "cat" else draw.rectangle)((x - r, y - r, x + r, y + r),
                                                                    fill=tuple(255 - c for c in colour))
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
        "transform": transforms.Compose([
            transforms.Resize(args.resize),
            transforms.CenterCrop(args.image_size),
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]),
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
    return {"seconds": time.perf_counter() - started, "forwards": forwards,
            "accuracy": accuracy / scored, "scored": scored}


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
        return stdout, wall, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=100)
    parser.add_argument("--test", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--resize", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--child", choices=["bare", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=64, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.resize = args.resize or round(args.image_size * 256 / 224)
    if args.child:
        result = child_bare(args) if args.child == "bare" else child_reference(args)
        print(json.dumps(result))
        return

    work = args.workdir or Path(tempfile.mkdtemp(prefix="vggft-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    torch_home = Path(os.environ.get("TORCH_HOME", work / "torch_home"))
    env = {**os.environ, "TORCH_HOME": str(torch_home), "VGGFT_CACHE": str(work / "cache")}
    data = work / "data"
    if not data.exists():
        make_jpegs(data, args.train, args.test)
    print(f"data: {data} ({args.train} train + {args.test} test JPEGs, 500x375); weights: {ensure_weights(torch_home)}")
    import torch

    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cuda {'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}")
    me = [sys.executable, __file__, "--image-size", str(args.image_size), "--resize", str(args.resize),
          "--epochs", str(args.epochs), "--data", str(data)]
    vggft = [sys.executable, "-m", "vggft", "train", "-q", "--set", f"data.root={data}",
             "--set", f"data.image_size={args.image_size}", "--set", f"data.resize={args.resize}",
             "--set", f"train.epochs={args.epochs}", "--set", f"output.weights={work / 'models' / 'VGG16.pt'}"]

    bare, bare_wall, bare_peak = run_child(me + ["--child", "bare"], env)
    print(f"bare features forward: {bare['images_per_s']:.2f} img/s")
    ref, ref_wall, ref_peak = run_child(me + ["--child", "reference"], env)
    print(f"reference: {ref_wall:.1f}s wall, acc {100 * ref['accuracy']:.2f}% of {ref['scored']}")
    cold, cold_wall, cold_peak = run_child(vggft, env)
    print(f"vggft cold: {cold_wall:.1f}s wall")
    warm, warm_wall, warm_peak = run_child(vggft, env)
    print(f"vggft warm: {warm_wall:.1f}s wall")

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

    rate, extracted = extraction_rate(cold)
    total = ref["forwards"]
    rows = [
        ("reference (tutorial loop)", ref_wall, total / ref_wall, ref_peak, f"{100 * ref['accuracy']:.2f}% (drop_last: {ref['scored']} of {args.test})", 1.0),
        ("vggft train, cold cache", cold_wall, (args.train + args.test) / cold_wall, cold_peak, test_accuracy(cold), ref_wall / cold_wall),
        ("vggft train, warm cache", warm_wall, (args.train + args.test) / warm_wall, warm_peak, test_accuracy(warm), ref_wall / warm_wall),
    ]
    print()
    print("| run | wall s | images/s | peak RSS MiB | test accuracy | speed-up |")
    print("|---|---:|---:|---:|---|---:|")
    for name, wall, ips, peak, acc, ratio in rows:
        print(f"| {name} | {wall:.1f} | {ips:.2f} | {peak:.0f} | {acc} | {ratio:.2f}x |")
    print()
    print(f"cold extraction: {rate:.2f} img/s over {extracted} images; bare features forward: "
          f"{bare['images_per_s']:.2f} img/s; ratio {rate / bare['images_per_s']:.2f}")
    print(f"(reference images/s counts its {total} forwards: {args.epochs} epochs x {args.train} train "
          f"+ {args.test} test, less drop_last; vggft's counts each image once)")


if __name__ == "__main__":
    main()
