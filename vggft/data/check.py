"""``vggft check-data``: what in an image folder would break or bias training, before training.

Counts usable images per split and class, lists every unreadable file with its reason,
sums up image sizes, measures class imbalance, and finds exact duplicates (same bytes)
across splits — leakage from train into test — and within a split. ``quarantine`` moves
the unreadable files aside, keeping their relative paths; nothing is ever deleted.
"""

from __future__ import annotations

import os
import shutil
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vggft.config.options import check_max_imbalance
from vggft.config.schema import Config
from vggft.data.folders import SPLITS, DataSplits, find_splits, unlearnable
from vggft.data.images import Verdict, VerdictLedger, inspect_all
from vggft.utils.errors import OutputError
from vggft.utils.files import cache_root, check_folder


@dataclass
class NearGroup:
    """Near-identical images (``vggft check-data --near-duplicates``): (split, path) members, and the lowest
    cosine similarity of the pooled features that links them."""

    members: list[tuple[str, str]]
    similarity: float


@dataclass
class DataReport:
    splits: DataSplits
    verdicts: dict[str, Verdict]
    counts: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)  # split -> class -> (ok, bad)
    bad: list[tuple[str, Verdict]] = field(default_factory=list)
    cross_duplicates: list[list[tuple[str, str]]] = field(default_factory=list)  # groups of (split, path)
    within_duplicates: list[list[tuple[str, str]]] = field(default_factory=list)
    imbalance: float = 1.0
    max_imbalance: float = 10.0
    near_cross: list[NearGroup] = field(default_factory=list)  # filled by diagnostics.near_duplicates when asked
    near_within: list[NearGroup] = field(default_factory=list)
    near_threshold: float | None = None  # None: near-duplicates were not looked for
    near_checked: int = 0

    @property
    def problems(self) -> list[str]:
        found = []
        if (why := unlearnable(self.splits)) is not None:
            found.append(why)
        if self.bad:
            found.append(f"{len(self.bad)} unreadable image(s)")
        if self.cross_duplicates:
            found.append(f"{len(self.cross_duplicates)} image(s) duplicated across splits (test leakage)")
        if self.within_duplicates:
            found.append(f"{len(self.within_duplicates)} image(s) duplicated within a split")
        if self.near_cross:
            found.append(f"{len(self.near_cross)} group(s) of near-duplicates across splits (test leakage)")
        if self.imbalance > 1 and self.imbalance >= self.max_imbalance:  # balanced data is never imbalanced
            found.append(f"class imbalance {self.imbalance:.1f}x in train (set data.balance: weights or sampler)")
        return found


def check_data(cfg: Config, *, max_imbalance: float = 10.0) -> DataReport:
    check_max_imbalance(max_imbalance)
    splits = find_splits(cfg.data)
    cache = VerdictLedger(cache_root(cfg.cache.dir) if cfg.cache.enabled else None, splits.root)
    # What check-data is asked to check it decodes afresh (a cached verdict could be of older bytes).
    verdicts = inspect_all([path for _, (path, _) in splits.all_samples()], cache, fresh=True)
    report = DataReport(splits, verdicts, max_imbalance=max_imbalance)
    for split in SPLITS:
        tally: dict[int, list[int]] = defaultdict(lambda: [0, 0])  # label -> [ok, bad], one pass over the split
        for path, label in splits[split]:
            tally[label][0 if verdicts[path].ok else 1] += 1
        per_class = {splits.class_names[label]: (ok, bad) for label, (ok, bad) in sorted(tally.items())}
        if per_class:
            report.counts[split] = per_class
    report.bad = [(p, verdicts[p]) for _, (p, _) in splits.all_samples() if not verdicts[p].ok]
    by_hash: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for split, (path, _) in splits.all_samples():
        if verdicts[path].ok:
            by_hash[verdicts[path].sha1].append((split, path))
    for group in by_hash.values():
        if len(group) > 1:
            if len({split for split, _ in group}) > 1:
                report.cross_duplicates.append(group)
            else:
                report.within_duplicates.append(group)
    train_counts = [ok for ok, _ in report.counts.get("train", report.counts.get("test", {})).values()]
    if train_counts and min(train_counts) > 0:
        report.imbalance = max(train_counts) / min(train_counts)
    elif train_counts:
        report.imbalance = float("inf")
    return report


def check_destination(destination: Path, option: str = "--quarantine") -> None:
    """Before anything is moved: ``destination`` must be a folder, or a folder that can be made."""
    check_folder(destination, option, "give another folder to move the files into")


def quarantine(report: DataReport, destination: Path, option: str = "--quarantine") -> list[tuple[Path, Path]]:
    """Move every unreadable file under ``destination``, keeping its path relative to data.root."""
    return move_files([path for path, _ in report.bad], report.splits.root, destination, option)


def move_files(
    paths: Sequence[str], root: Path, destination: Path, option: str = "--quarantine"
) -> list[tuple[Path, Path]]:
    """Move each of ``paths`` under ``destination``, keeping its path relative to ``root`` (data.root)."""
    check_destination(destination, option)
    moved: list[tuple[Path, Path]] = []
    for path in paths:
        target = Path(destination) / os.path.relpath(path, root)
        candidate, n = target, 1
        while candidate.exists():  # never overwrite an earlier quarantined file
            candidate = target.with_name(f"{target.stem}.{n}{target.suffix}")
            n += 1
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(path, candidate)
        except OSError as err:
            raise OutputError(
                f"{option}: could not move '{path}' to '{candidate}' ({err.strerror}); {len(moved)} "
                "file(s) were moved before it, nothing was deleted"
            ) from None
        moved.append((Path(path), candidate))
    return moved
