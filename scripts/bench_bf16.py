#!/usr/bin/env python
"""Benchmark: bf16 on the CPU's matrix units, and JPEGs decoded at the size they are needed (issue 22).

One run, one process, every number measured in it (best of --repeat rounds; the machine's other load
makes single rounds noisy):

1. bare       -- the VGG-16 ``features`` forward (the layers extraction runs) in inference mode on a random
                 batch: fp32 and bf16 autocast, NCHW and channels_last (the ceiling);
2. extraction -- vggft's extraction (``features.cache.extract_features``: Pillow, eval transform, the
                 layout ``extraction_layout`` picks, autocast) on --images JPEGs of 500x375, cache cold,
                 at the precision ``train.amp: auto`` picks here; its ratio to the bare forward of the same
                 precision and layout (target: 0.8 or more);
3. phone      -- the same on 4000x3000 JPEGs, data.decode pil and draft; draft's ratio to 500x375
                 (target: 0.7 or more);
4. accuracy   -- relative error of the features: bf16 against fp32, draft against pil (the 4000x3000 set).

    python scripts/bench_bf16.py                          # 32 images a set, batch 32, 224 px
    python scripts/bench_bf16.py --images 8 --batch 8 --image-size 64 --repeat 1   # a smoke run
    # A CPU without bf16 units, emulated (oneDNN and ATen held to AVX2): the bare forward alone
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python scripts/bench_bf16.py --bare-only --batch 16
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torchvision.models import vgg16

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import make_jpegs
from vggft.config.schema import DataConfig
from vggft.data.decode import draft_target
from vggft.data.transforms import eval_transform
from vggft.features.cache import FeatureCache, extract_features
from vggft.utils.device import PRECISION, autocast_dtype, autocast_factory, cpu_bf16, extraction_layout
from vggft.utils.logs import log

CPU = torch.device("cpu")
LAYOUTS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}


def rounds(runs: dict, images: dict, repeat: int) -> dict:
    """images/s of each run, the fastest of ``repeat`` rounds; each round runs every one once, so a change
    in the machine's other load hits the ceiling and the extraction alike."""
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeat):
        for key, run in runs.items():
            started = time.perf_counter()
            run()
            best[key] = min(best[key], time.perf_counter() - started)
    return {key: images[key] / seconds for key, seconds in best.items()}


def forward(prefix, autocast, images):
    def run() -> None:
        with torch.inference_mode(), autocast():
            prefix(images)

    return run


def bare_runs(prefixes: dict, args) -> dict:
    """("bare", precision, layout) -> a call of the bare forward on a random batch."""
    runs = {}
    batch = torch.randn(args.batch, 3, args.image_size, args.image_size)
    for name, layout in LAYOUTS.items():
        images = batch.contiguous(memory_format=layout)
        for precision in (None, torch.bfloat16):
            run = forward(prefixes[layout], autocast_factory(CPU, precision), images)
            run()  # oneDNN's first call per shape and layout builds its kernels
            runs["bare", PRECISION[precision], name] = run
    return runs


def extraction_run(prefixes: dict, folder: Path, args, precision, decode, kept: dict, key) -> tuple:
    """(a cold extraction of every JPEG under ``folder`` as FeatureSource runs it, the number of images);
    each call leaves its features in ``kept[key]``."""
    data = DataConfig(root=str(folder), image_size=args.image_size, resize=args.resize, decode=decode)
    samples = [(str(path), 0) for path in sorted(folder.rglob("*.jpg"))]
    layout = extraction_layout(CPU, precision)

    def run() -> None:
        rows = extract_features(
            prefixes[layout],
            samples,
            eval_transform(data),
            FeatureCache(None, {}),  # in memory, empty: every round is cold
            device=CPU,
            batch_size=args.batch,
            num_workers=args.workers,
            autocast=autocast_factory(CPU, precision),
            draft=draft_target(data) if decode == "draft" else None,
            layout=layout,
        )
        kept[key] = rows.tensor()

    return run, len(samples)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def make_sets(root: Path, count: int) -> tuple[Path, Path]:
    """``count`` JPEGs of 500x375 and of 4000x3000 (a few distinct ones copied: writing 12 MP is slow)."""
    small, large = root / "small", root / "large"
    make_jpegs(small, count, 0)
    distinct = min(count, 4)
    make_jpegs(root / "seed", distinct, 0, size=(4000, 3000))
    seeds = sorted((root / "seed").rglob("*.jpg"))
    large.mkdir()
    for index in range(count):
        shutil.copy(seeds[index % distinct], large / f"{index}.jpg")
    return small, large


def main() -> None:
    args = parse_args()
    log.disabled = True  # extract_features' own rate note: this script prints its table instead
    torch.manual_seed(0)
    prefix = vgg16().features.eval().requires_grad_(False)
    prefixes = {layout: copy.deepcopy(prefix).to(memory_format=layout) for layout in LAYOUTS.values()}
    auto = autocast_dtype(CPU, "auto")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; native bf16: {cpu_bf16() or 'none'}")
    print(f"train.amp: auto -> {PRECISION[auto]}; batch {args.batch}, {args.image_size} px; best of {args.repeat}")
    if args.bare_only:
        runs = bare_runs(prefixes, args)
        rates = rounds(runs, dict.fromkeys(runs, args.batch), args.repeat)
        for key, rate in rates.items():
            print(f"bare {key[1]:4} {key[2]:13} {rate:7.1f} img/s")
        for name in LAYOUTS:
            print(f"{name}: bf16 / fp32 {rates['bare', 'bf16', name] / rates['bare', 'fp32', name]:.2f}x")
        return
    with tempfile.TemporaryDirectory(prefix="vggft-bf16-") as folder:
        small, large = make_sets(Path(folder), args.images)
        runs = bare_runs(prefixes, args)
        images = dict.fromkeys(runs, args.batch)
        kept: dict = {}
        for precision in (None, torch.bfloat16):
            for name, where, decode in (
                ("500x375", small, "pil"),
                ("4000x3000", large, "pil"),
                ("4000x3000", large, "draft"),
            ):
                key = "extraction", PRECISION[precision], name, decode
                runs[key], images[key] = extraction_run(prefixes, where, args, precision, decode, kept, key)
        report(rounds(runs, images, args.repeat), kept)


def report(rates: dict, kept: dict) -> None:
    for key, rate in rates.items():
        if key[0] == "bare":
            print(f"bare {key[1]:4} {key[2]:13} {rate:7.1f} img/s")
    for key, rate in rates.items():
        if key[0] == "extraction":
            dtype = torch.bfloat16 if key[1] == "bf16" else None
            layout = next(n for n, f in LAYOUTS.items() if f == extraction_layout(CPU, dtype))
            ceiling = rates["bare", key[1], layout]
            print(
                f"extraction {key[1]:4} {layout:13} {key[2]:9} {key[3]:5} {rate:7.1f} img/s, "
                f"{rate / ceiling:.2f}x the bare forward"
            )
    for precision in ("fp32", "bf16"):
        small = rates["extraction", precision, "500x375", "pil"]
        draft, plain = (rates["extraction", precision, "4000x3000", decode] for decode in ("draft", "pil"))
        print(f"{precision}: 4000x3000 draft / 500x375 {draft / small:.2f}x (pil: {plain / small:.2f}x)")
    bf16, fp32 = kept["extraction", "bf16", "500x375", "pil"], kept["extraction", "fp32", "500x375", "pil"]
    draft, pil = kept["extraction", "fp32", "4000x3000", "draft"], kept["extraction", "fp32", "4000x3000", "pil"]
    print(
        f"relative error: bf16 vs fp32 {relative_error(bf16, fp32):.1e}, draft vs pil {relative_error(draft, pil):.1e}"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--images", type=int, default=32, help="JPEGs in each set")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--bare-only", action="store_true", help="the bare forward alone, no JPEGs")
    parser.add_argument(
        "--workers", type=int, default=0, help="DataLoader workers (vggft's auto: 0 on 4 cores or fewer)"
    )
    return parser.parse_args()


if __name__ == "__main__":
    main()
