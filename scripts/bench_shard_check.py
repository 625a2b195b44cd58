#!/usr/bin/env python
"""Benchmark: what verifying the feature cache's shards (the digest their index records) costs next to reading them.

Writes a synthetic cache through ``FeatureCache.add`` (shards of SHARD_ROWS rows, as an extraction writes
them), then times, in the same run: mapping and checking every shard (``torch.load`` with mmap, row count,
width, finite float32: what a read did before digests); hashing every shard (SHA-256 through a mapping, as
now; through 4 MiB reads; SHA-1 and CRC32 for comparison); a whole open as a run does it (index, verify, map,
check: ``key in cache`` for every key), with the per-process memo cleared (now) and hit (no hash: the open
before digests); and, for scale, one epoch's forward of the head over as many rows (the least a warm train
does per epoch). Page cache warm, then cold (each shard's pages dropped with posix_fadvise first). Each
timing is the median of ``--repeats``; the ratios are to mapping and checking, in the same run.

    python scripts/bench_shard_check.py                          # 20,000 rows, 4096 (classifier6) and 512 (gap)
    python scripts/bench_shard_check.py --rows 2000 --repeats 3  # a quick look
"""

from __future__ import annotations

import argparse
import hashlib
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from vggft.features import cache as feature_cache
from vggft.features.cache import SHARD_ROWS, FeatureCache, shard_digest
from vggft.utils.files import file_digest, save_text, save_torch


def _mapped(path: Path, digest: Callable[[memoryview], object]) -> object:
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
        return digest(memoryview(view))


def _drop(shards: list[Path]) -> None:
    """Drop the shards' pages from the page cache (clean pages of files no one maps)."""
    for shard in shards:
        fd = os.open(shard, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _median(work: Callable[[], object], repeats: int, before: Callable[[], None] | None = None) -> float:
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _write(root: Path, rows: int, width: int) -> tuple[list[str], list[Path], float, float]:
    """The keys, the shards, the seconds ``FeatureCache.add`` took, and those the same writes took without a
    digest (save_torch, then the index of keys alone: what ``add`` did before)."""
    namespace = {"bench": "shard check", "width": width}
    generator = torch.Generator().manual_seed(width)
    keys = [hashlib.sha1(f"{width}|{i}".encode()).hexdigest() for i in range(rows)]
    cache, plain, added, saved = FeatureCache(root, namespace, width), root / "plain", 0.0, 0.0
    for start in range(0, rows, SHARD_ROWS):
        features = torch.randn(min(SHARD_ROWS, rows - start), width, generator=generator)
        chunk = keys[start : start + SHARD_ROWS]
        started = time.perf_counter()
        save_torch({"keys": chunk, "features": features}, plain / f"{start}.pt")
        save_text("".join(f"{key}\n" for key in chunk), plain / f"{start}.keys")
        saved += time.perf_counter() - started
        started = time.perf_counter()
        cache.add(chunk, features)
        added += time.perf_counter() - started
        cache.rows.clear()  # a reader's memory only
    shutil.rmtree(plain)
    return keys, sorted(cache.shard_folder.glob("*.pt")), added, saved


def _open(root: Path, width: int, keys: list[str], memo: bool) -> FeatureCache:
    if not memo:
        feature_cache._verified.clear()
    cache = FeatureCache(root, {"bench": "shard check", "width": width}, width)
    assert all(key in cache for key in keys), "a shard was discarded"
    return cache


def _head_epoch(rows: int, width: int, repeats: int) -> float:
    """Seconds one epoch's forward of the head over ``rows`` rows takes (the least a warm train does per epoch),
    timed on 2,048 rows in batches of 64 and scaled: classifier6's frozen Linear(4096, 4096), ReLU and a new
    Linear(4096, 2) for 4096-wide rows, gap's Linear(512, 2) for 512."""
    head = torch.nn.Linear(width, 2)
    if width == 4096:
        head = torch.nn.Sequential(torch.nn.Linear(4096, 4096), torch.nn.ReLU(), head)
    batches = torch.randn(32, 64, width)

    def forward() -> None:
        with torch.no_grad():
            for batch in batches:
                head(batch)

    forward()
    return _median(forward, repeats) * rows / (32 * 64)


def measure(root: Path, rows: int, width: int, repeats: int) -> list[tuple[str, float]]:
    keys, shards, added, saved = _write(root, rows, width)
    reader = FeatureCache(None, {}, width)
    size = sum(shard.stat().st_size for shard in shards)
    every = {
        "map + check (torch.load mmap, finite)": lambda: [reader._load(shard) for shard in shards],
        "sha256, mapped (now)": lambda: [shard_digest(shard) for shard in shards],
        "sha256, 4 MiB reads": lambda: [file_digest(shard) for shard in shards],
        "sha1, mapped": lambda: [_mapped(shard, lambda v: hashlib.sha1(v).digest()) for shard in shards],
        "crc32, mapped": lambda: [_mapped(shard, zlib.crc32) for shard in shards],
        "open now: verify + map + check": lambda: _open(root, width, keys, memo=False),
        "open, memo hit (no hash: the open before digests)": lambda: _open(root, width, keys, memo=True),
    }
    cold = ["map + check (torch.load mmap, finite)", "sha256, mapped (now)", "open now: verify + map + check"]
    results = [
        (f"write: shard + index, no digest ({len(shards)} shards)", saved),
        ("write: FeatureCache.add now (+ sha256)", added),
    ]
    for name, work in every.items():
        _median(work, 1)  # warm the page cache
        results.append((f"warm: {name}", _median(work, repeats)))
    results.append(("one epoch's forward of the head (no backward), for scale", _head_epoch(rows, width, repeats)))
    for name in cold:
        results.append((f"cold: {name}", _median(every[name], repeats, lambda: _drop(shards))))
    print(f"\n{rows:,} rows x {width} float32: {len(shards)} shards, {size / 2**20:,.0f} MiB")
    return results


def report(results: list[tuple[str, float]], size_mib: float) -> None:
    seconds_of = dict(results)
    reference = {phase: seconds_of[f"{phase}: map + check (torch.load mmap, finite)"] for phase in ("warm", "cold")}
    print("| what | seconds | MiB/s | x map + check |\n|---|---:|---:|---:|")
    for name, seconds in results:
        phase = name.split(":")[0]
        ratio = f"{seconds / reference[phase]:.2f}" if phase in reference else ""
        rate = f"{size_mib / seconds:,.0f}" if phase in reference or phase == "write" else ""
        print(f"| {name} | {seconds:.3f} | {rate} | {ratio} |")
    before = seconds_of["warm: open, memo hit (no hash: the open before digests)"]
    added = seconds_of["warm: open now: verify + map + check"] - before
    epoch = seconds_of["one epoch's forward of the head (no backward), for scale"]
    print(
        f"verifying adds {added:.3f} s to a warm open: {added / before:.2f}x the open before digests, "
        f"{added / epoch:.3f}x one epoch's forward"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--widths", default="4096,512", help="row widths: 4096 classifier6, 512 gap (vgg16)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where the synthetic cache goes (a disk, not tmpfs)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as a head on cached rows trains (training.loop.row_threads)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, repeats {args.repeats} (median)")
    for width in map(int, args.widths.split(",")):
        root = Path(tempfile.mkdtemp(prefix="vggft-bench-shards-", dir=args.dir))
        try:
            results = measure(root, args.rows, width, args.repeats)
            report(results, args.rows * width * 4 / 2**20)
        finally:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
