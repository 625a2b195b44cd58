#!/usr/bin/env python
"""Benchmark: what a train start spends hashing the frozen weights of torchvision's real VGG-16.

The feature cache names its folder by the frozen prefix's hash; a checkpoint records the fingerprint of
everything frozen. Both are timed as a train start does them, now (the checkpoint's fingerprint made of the
prefix's hash and the rest's) against the reference measured in the same run (the earlier whole-stream
fingerprint, which hashed the prefix a second time). Random init: no weights file needed; about 1.5 GB.

    python scripts/bench_fingerprint.py            # 5 repeats, the median of each
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from vggft.config.loading import load_config
from vggft.features.cache import FeatureSource, module_fingerprint
from vggft.model.build import build_model
from vggft.model.checkpoints import trainable_state
from vggft.model.fingerprint import frozen_fingerprint, legacy_frozen_fingerprint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--head", default="classifier6", choices=("classifier6", "gap"))
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = load_config(None, ["model.weights=null", f"model.head={args.head}", f"cache.dir={tempfile.mkdtemp()}"])
    model = build_model(cfg.model, 2, None)
    trainable = trainable_state(model)
    frozen = sum(t.numel() * t.element_size() for k, t in model.state_dict().items() if k not in trainable)
    now, before = [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        source = FeatureSource(model, cfg, torch.device("cpu"), None)
        frozen_fingerprint(model, trainable, source.prefix_weights)
        now.append(time.perf_counter() - started)
        started = time.perf_counter()
        module_fingerprint(source.prefix)  # what FeatureSource hashed
        legacy_frozen_fingerprint(model, trainable)
        before.append(time.perf_counter() - started)
    now_s, before_s = statistics.median(now), statistics.median(before)
    print(f"vgg16, {args.head} head: {frozen / 2**20:.0f} MiB of frozen weights")
    print(f"reference (prefix hashed twice): {before_s:.3f} s")
    print(f"now (hashed once):               {now_s:.3f} s  ({before_s / now_s:.2f}x faster)")


if __name__ == "__main__":
    main()
