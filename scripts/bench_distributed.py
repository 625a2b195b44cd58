#!/usr/bin/env python
"""Benchmark: `vggft train` in one process against `vggft train --nproc N`, same data and weights, one run.

Each side starts from an empty feature cache, so the time is dominated by extraction, the part the
processes share. Prints wall seconds, both test lines (they must count the same images) and the ratio.

    python scripts/bench_distributed.py                  # 100 train + 50 test, 2 processes
    python scripts/bench_distributed.py --nproc 4 --train 400 --test 100
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench import ensure_weights, make_jpegs


def train(root: Path, work: Path, nproc: int, args, env: dict) -> tuple[float, str]:
    cmd = [
        sys.executable,
        "-m",
        "vggft",
        "train",
        "--nproc",
        str(nproc),
        "--quiet",
        "--set",
        f"data.root={root}",
        "--set",
        f"train.epochs={args.epochs}",
        "--set",
        f"data.image_size={args.image_size}",
        "--set",
        f"data.resize={args.resize}",
        "--set",
        f"output.weights={work / f'p{nproc}' / 'VGG16.pt'}",
        "--set",
        f"output.runs_dir={work / f'p{nproc}' / 'runs'}",
        "--set",
        f"cache.dir={work / f'cache{nproc}'}",
    ]
    started = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{result.stderr[-3000:]}")
    test = re.search(r"^Test: (.*)$", result.stdout, re.M)
    return wall, test[1] if test else "(no test split)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--train", type=int, default=100)
    parser.add_argument("--test", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--resize", type=int, default=256)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="vggft-bench-ddp-") as tmp:
        work = Path(tmp)
        make_jpegs(work / "data", args.train, args.test)
        env = {**os.environ, "TORCH_HOME": os.environ.get("TORCH_HOME", str(work / "torch_home"))}
        print(f"weights: {ensure_weights(Path(env['TORCH_HOME']))}")
        print(
            f"machine: {os.cpu_count()} CPUs; {args.train} train + {args.test} test images, "
            f"{args.image_size} px, {args.epochs} epochs, cold cache each"
        )
        one, one_test = train(work / "data", work, 1, args, env)
        many, many_test = train(work / "data", work, args.nproc, args, env)
        print(f"{'run':<14} {'wall s':>8}  test")
        print(f"{'1 process':<14} {one:>8.1f}  {one_test}")
        print(f"{f'{args.nproc} processes':<14} {many:>8.1f}  {many_test}")
        print(f"speed-up: {one / many:.2f}x")


if __name__ == "__main__":
    main()
