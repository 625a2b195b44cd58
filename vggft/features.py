"""The exact feature cache: run the frozen prefix once per image, keep its output on disk.

With a frozen backbone and a deterministic transform, every epoch recomputes the
same prefix outputs. ``FeatureCache`` stores them in a folder named by everything
that decides them (the prefix's weights and layers, the cut, the transform, the
precision); inside, one row per image keyed by the file's path, size and mtime,
so a changed image invalidates only its own row.

Storage is append-only: each extraction writes a new shard file (atomically); a shard
that fails to load or does not add up is deleted and its rows extracted again.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .distributed import SINGLE, Group
from .errors import ConfigError
from .files import save_json, save_torch
from .loaders import image_loader

SHARD_ROWS = 1024  # write a shard at least this often, so an interrupted extraction keeps its work


def file_key(path: str) -> str:
    st = os.stat(path)
    return hashlib.sha1(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()


def module_fingerprint(module: nn.Module) -> str:
    """A content hash of a module's layers and weights: identical prefixes share a cache."""
    digest = hashlib.sha1(repr(module).encode())
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


class FeatureCache:
    """Rows of prefix outputs keyed by ``file_key``; kept on disk under ``directory`` (or in memory)."""

    def __init__(self, directory: Path | None, namespace: dict, log: Callable[[str], None] = print):
        self.rows: dict[str, torch.Tensor] = {}
        self.loaded: set[str] = set()  # shard files already read
        self.log = log
        self.folder = None
        if directory is None:
            return
        name = hashlib.sha1(json.dumps(namespace, sort_keys=True).encode()).hexdigest()[:20]
        self.folder = directory / "features" / name
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / "namespace.json").exists():
            save_json(namespace, self.folder / "namespace.json")
        self._load_shards()

    def _load_shards(self) -> None:
        for shard in sorted(self.folder.glob("*.pt")):
            if shard.name in self.loaded:
                continue
            try:
                body = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
                keys, features = body["keys"], body["features"]
                if not (isinstance(keys, list) and features.dim() == 2 and len(keys) == features.shape[0]):
                    raise ValueError("keys and rows do not add up")
                if features.dtype != torch.float32 or not torch.isfinite(features).all():
                    raise ValueError("not finite float32 rows")
            except Exception as err:  # corrupt, truncated or foreign: never trusted, rebuilt
                self.log(f"Feature cache: discarding damaged shard {shard} ({type(err).__name__}); re-extracting")
                shard.unlink(missing_ok=True)
                continue
            self.rows.update(zip(keys, features))
            self.loaded.add(shard.name)

    def add(self, keys: list[str], features: torch.Tensor) -> None:
        features = features.float().contiguous()
        self.rows.update(zip(keys, features))
        if self.folder is not None:
            shard = self.folder / f"{time.time_ns()}-{os.getpid()}.pt"
            try:
                save_torch({"keys": keys, "features": features}, shard)
                self.loaded.add(shard.name)
            except Exception as err:
                self.log(f"Feature cache: could not write {shard} ({err}); continuing without saving")

    def reload(self) -> None:
        """Read the shards other processes have written since."""
        if self.folder is not None:
            self._load_shards()

    def __contains__(self, key: str) -> bool:
        return key in self.rows


def extract_features(
    prefix: nn.Module,
    samples: Sequence[tuple[str, int]],
    transform,
    cache: FeatureCache,
    *,
    device: torch.device,
    batch_size: int,
    num_workers: int,
    autocast: Callable,
    progress: bool = True,
    desc: str = "Extracting features",
    group: Group = SINGLE,
) -> torch.Tensor:
    """The prefix output for every sample, in order; only files the cache lacks go through the network.

    Under torchrun each rank extracts its own shard of the missing files into the shared cache folder,
    then every rank reads all of them: N processes extract N times faster and no file twice.
    """
    keys = [file_key(path) for path, _ in samples]
    missing = [(sample, key) for sample, key in zip(samples, keys) if key not in cache]
    missing = list({key: (sample, key) for sample, key in missing}.values())  # the same file twice: once
    total_missing, started = len(missing), time.perf_counter()
    group.barrier()  # every rank has its list before any rank writes a shard: the lists agree
    missing = group.shard(missing)
    if missing:
        loader = image_loader(
            [sample for sample, _ in missing], transform, batch_size, device=device, num_workers=num_workers
        )
        pending_keys: list[str] = []
        pending: list[torch.Tensor] = []
        done = 0
        bar = tqdm(total=len(missing), desc=desc, unit="img", disable=not progress, leave=False)
        for images, _ in loader:
            images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
            with torch.inference_mode(), autocast():
                output = prefix(images)
            pending.append(output.float().cpu())
            pending_keys.extend(key for _, key in missing[done : done + len(images)])
            done += len(images)
            bar.update(len(images))
            if len(pending_keys) >= SHARD_ROWS:
                cache.add(pending_keys, torch.cat(pending))
                pending_keys, pending = [], []
        bar.close()
        if pending_keys:
            cache.add(pending_keys, torch.cat(pending))
    if total_missing and group.active:
        group.barrier()  # every rank's shards are on disk
        cache.reload()
        if any(key not in cache for key in keys):
            raise ConfigError(
                f"cache.dir: '{cache.folder}' does not hold the features the other processes extracted; on "
                "several machines it must be a shared folder every node sees (set cache.dir), or use cache: off"
            )
    if total_missing:
        seconds = time.perf_counter() - started
        ranks = f" on {group.world} processes" if group.active else ""
        cache.log(f"{desc}: {total_missing} images in {seconds:.1f}s ({total_missing / seconds:.2f} img/s){ranks}")
    if not keys:
        return torch.empty(0)
    # Stacked outside inference mode: a normal tensor that autograd may save for backward.
    return torch.stack([cache.rows[key] for key in keys])
