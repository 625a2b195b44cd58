"""Decoding every image once, remembering the verdicts, and leaving the bad ones out.

A verdict is cached per file, keyed by its path, size and modification time, so a
second run decodes only what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from .config import DataConfig
from .datasets import SPLITS, DataSplits
from .errors import DataError
from .files import save_json, save_text
from .images import Verdict, inspect_image

Log = Callable[[str], None]


def _stat_key(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


class VerdictCache:
    """A JSON file of {absolute path: [size, mtime_ns, verdict]} for one data root."""

    def __init__(self, cache_dir: Path | None, root: Path):
        self.path = None
        self.entries: dict[str, list] = {}
        if cache_dir is None:
            return
        digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
        self.path = cache_dir / "images" / f"{root.resolve().name}-{digest}.json"
        try:
            loaded = json.loads(self.path.read_text(encoding="utf-8"))
            if isinstance(loaded, dict):
                self.entries = loaded
        except (OSError, ValueError):
            self.entries = {}  # missing or corrupt: rebuilt from scratch, never trusted

    def get(self, path: str, key: list[int] | None) -> Verdict | None:
        entry = self.entries.get(os.path.abspath(path))
        if key is None or not isinstance(entry, list) or len(entry) != 3 or entry[:2] != key:
            return None
        try:
            return Verdict.from_dict(entry[2])
        except TypeError:
            return None

    def put(self, path: str, key: list[int] | None, verdict: Verdict) -> None:
        if key is not None:
            self.entries[os.path.abspath(path)] = [*key, verdict.to_dict()]

    def save(self) -> None:
        if self.path is not None:
            try:
                save_json(self.entries, self.path)
            except Exception:  # the cache is an optimisation: failing to write it must not fail a run
                pass

    @property
    def bad_list_path(self) -> Path | None:
        return None if self.path is None else self.path.with_suffix(".bad.txt")


def inspect_all(paths: list[str], cache: VerdictCache, progress: bool = True) -> dict[str, Verdict]:
    """A verdict for every path, decoding only those the cache does not know."""
    verdicts: dict[str, Verdict] = {}
    todo: list[tuple[str, list[int] | None]] = []
    for path in paths:
        key = _stat_key(path)
        cached = cache.get(path, key)
        if cached is not None:
            verdicts[path] = cached
        else:
            todo.append((path, key))
    if todo:
        workers = min(len(todo), os.cpu_count() or 1, 8)
        with ThreadPoolExecutor(workers) as pool:  # Pillow releases the GIL while decoding
            results = pool.map(lambda item: inspect_image(item[0]), todo)
            bar = tqdm(results, total=len(todo), desc="Checking images", unit="img", disable=not progress, leave=False)
            for (path, key), verdict in zip(todo, bar):
                verdicts[path] = verdict
                cache.put(path, key, verdict)
        cache.save()
    return verdicts


@dataclass
class BadImages:
    files: list[tuple[str, Verdict]] = field(default_factory=list)
    list_path: Path | None = None

    def __len__(self) -> int:
        return len(self.files)

    def lines(self) -> list[str]:
        return [f"{path}\t{v.reason}\t{v.detail}" for path, v in self.files]


def drop_bad_images(
    splits: DataSplits, data: DataConfig, cache_dir: Path | None, log: Log = print, progress: bool = True
) -> tuple[DataSplits, BadImages]:
    """Decode every image once (cached); leave the unreadable out, or stop, per ``data.bad_images``."""
    cache = VerdictCache(cache_dir, splits.root)
    paths = [path for _, (path, _) in splits.all_samples()]
    verdicts = inspect_all(paths, cache, progress=progress)
    bad = BadImages([(path, verdicts[path]) for path in paths if not verdicts[path].ok])
    if not bad:
        return splits, bad
    bad.list_path = cache.bad_list_path
    if bad.list_path is not None:
        save_text("\n".join(bad.lines()) + "\n", bad.list_path)
    first_path, first = bad.files[0]
    where = f"; full list: {bad.list_path}" if bad.list_path else ""
    if data.bad_images == "error":
        raise DataError(
            f"{len(bad)} unreadable image(s) under {splits.root} (first: {first_path}: {first.reason})"
            f"{where}; fix or remove them (vggft check-data --quarantine DIR moves them), "
            "or set data.bad_images: skip"
        )
    log(f"Skipping {len(bad)} unreadable image(s) (first: {first_path}: {first.reason}){where}")
    good = {split: [s for s in splits[split] if verdicts[s[0]].ok] for split in SPLITS if split in splits.splits}
    kept = DataSplits(splits.root, splits.layout, splits.class_names, good)
    for split, samples in kept.splits.items():
        present = {label for _, label in samples}
        before = {label for _, label in splits[split]}
        for label in sorted(before - present):
            raise DataError(
                f"{splits.root}: every image of class '{splits.class_names[label]}' in the {split} split "
                f"is unreadable{where}; replace them or remove the class"
            )
    return kept, bad
