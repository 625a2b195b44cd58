"""``vggft check-data``: what in an image folder would break or bias training, before training.

Counts usable images per split and class, lists every unreadable file with its reason,
sums up image sizes, measures class imbalance, and finds exact duplicates (same bytes)
across splits — leakage from train into test — and within a split. ``quarantine`` moves
the unreadable files aside, keeping their relative paths; nothing is ever deleted.
"""

from __future__ import annotations

import csv
import os
import shutil
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from vggft.config.options import check_max_imbalance
from vggft.config.schema import Config
from vggft.data.folders import SPLITS, DataSplits, find_splits, unlearnable
from vggft.data.images import Verdict, VerdictLedger, inspect_all
from vggft.utils.errors import ConfigError, OutputError
from vggft.utils.files import cache_root, check_folder, save_csv
from vggft.utils.locks import folder_lock


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


def check_move_destination(destination: Path, root: str | Path, option: str) -> None:
    """Before any work: ``destination`` is outside ``root`` (data.root), where the moved files would be found
    again (as a class of their own), and a folder that is or can be made."""
    if Path(destination).resolve().is_relative_to(Path(root).resolve()):
        raise OutputError(
            f"{option} {destination}: is inside data.root, where the moved images would be found again; "
            "choose a folder outside it"
        )
    check_destination(Path(destination), option)


def moving_out(root: str | Path, option: str):
    """A lock on data.root while files are moved out of it (held from before the scan to the last move): a second
    ``label-issues --move`` or ``check-data --quarantine`` on the same data is refused before any work."""
    busy = (
        f"{option}: another vggft command ({{who}}) is moving files out of '{root}' right now (label-issues "
        "--move or check-data --quarantine); wait for it to end and review what it moved, then run this again"
    )
    return folder_lock(root, busy)


def quarantine(report: DataReport, destination: Path, option: str = "--quarantine") -> list[tuple[Path, Path]]:
    """Move every unreadable file under ``destination``, keeping its path relative to data.root."""
    return move_files([path for path, _ in report.bad], report.splits.root, destination, option)


def move_files(
    paths: Sequence[str], root: Path, destination: Path, option: str = "--quarantine", *, record: Path | None = None
) -> list[tuple[Path, Path]]:
    """Move each of ``paths`` under ``destination``, keeping its path relative to ``root`` (data.root). With
    ``record``, the moves are listed there first (``MoveLog``) and each is marked once done."""
    check_destination(destination, option)
    moved: list[tuple[Path, Path]] = []
    log = MoveLog(record) if record is not None else None
    if log is not None:
        log.plan([(Path(path), _free_name(Path(destination) / os.path.relpath(path, root))) for path in paths])
    listed = f" (listed in {record})" if record is not None else ""
    try:
        for path in paths:
            target = Path(destination) / os.path.relpath(path, root)
            candidate = _free_name(target)
            if log is not None:
                log.mark(Path(path), candidate, "planned")  # where it goes, should that have changed
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(path, candidate)
            except OSError as err:
                gone = (
                    " (gone: moved or deleted by another process since it was listed)"
                    if not os.path.lexists(path)
                    else ""
                )
                raise OutputError(
                    f"{option}: could not move '{path}' to '{candidate}' ({err.strerror}){gone}; {len(moved)} "
                    f"file(s) were moved before it{listed}, nothing was deleted"
                ) from None
            moved.append((Path(path), candidate))
            if log is not None:
                log.mark(Path(path), candidate, "moved")
    finally:
        if log is not None:
            log.close()
    return moved


def _free_name(target: Path) -> Path:
    """``target``, or ``name.1.ext``, ``name.2.ext``, ...: never an earlier moved file's name."""
    candidate, n = target, 1
    while candidate.exists():
        candidate = target.with_name(f"{target.stem}.{n}{target.suffix}")
        n += 1
    return candidate


MOVES_HEADER = ("source", "destination", "status")


class MoveLog:
    """``moves.csv`` (source, destination, status): written whole before the first move, every file ``planned``;
    then a row appended and synced as each file is ``moved`` (or put back: ``restored``), so that a kill or
    Ctrl-C leaves the list of what moved; rewritten whole, one row per file, at the end. A file's last row is
    where it is (a ``planned`` one may have moved just as the command was stopped: its destination says)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows: dict[str, list[str]] = {}  # source -> its row
        self._handle: TextIO | None = None

    def plan(self, pairs: Sequence[tuple[Path, Path]]) -> None:
        self.rows = {str(source): [str(source), str(target), "planned"] for source, target in pairs}
        save_csv(self.path, MOVES_HEADER, self.rows.values())

    def mark(self, source: Path, destination: Path, status: str) -> None:
        row = [str(source), str(destination), status]
        if self.rows.get(row[0]) == row:
            return
        self.rows[row[0]] = row
        try:
            if self._handle is None:
                self._handle = open(self.path, "a", newline="", encoding="utf-8", errors="surrogateescape")
            csv.writer(self._handle).writerow(row)
            self._handle.flush()
            os.fsync(self._handle.fileno())
        except OSError as err:
            raise OutputError(
                f"{self.path}: could not be written ({err.strerror}); it lists the files moved so far, the rest "
                "were not moved"
            ) from None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        save_csv(self.path, MOVES_HEADER, self.rows.values())

    @classmethod
    def read(cls, path: Path, option: str) -> MoveLog:
        log = cls(path)
        try:
            with open(path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
                rows = list(csv.reader(handle))
        except OSError as err:
            raise ConfigError(
                f"{option}: cannot read '{path}' ({err.strerror}); give the run folder of a label-issues --move "
                "(it holds moves.csv)"
            ) from None
        if not rows or tuple(rows[0]) != MOVES_HEADER:
            raise ConfigError(
                f"{option}: '{path}' is not a list of moves ({', '.join(MOVES_HEADER)}); give the "
                "run folder of a label-issues --move"
            )
        log.rows = {row[0]: row for row in rows[1:] if len(row) == len(MOVES_HEADER)}
        return log


def undo_moves(record: Path, option: str = "--undo") -> tuple[list[tuple[Path, Path]], int]:
    """Put back every file ``record`` (a ``MoveLog``) lists as moved, or planned and found at its destination;
    refused, putting back nothing, where another file took one's old place. Returns the files put back
    (from, to) and how many moved ones are no longer at their destination (reviewed: left as they are)."""
    log = MoveLog.read(record, option)
    back: list[tuple[Path, Path]] = []  # (where it is, where it was)
    gone = 0
    for was, went, status in log.rows.values():
        if status == "restored":
            continue
        if os.path.lexists(went):
            if os.path.lexists(was):
                raise OutputError(
                    f"{option}: '{was}' is occupied (another file is there now), so '{went}' cannot go back; "
                    f"move one of them aside and run {option} again; nothing was put back"
                )
            back.append((Path(went), Path(was)))
        elif status == "moved" and not os.path.lexists(was):
            gone += 1
    done: list[tuple[Path, Path]] = []
    try:
        for moved, home in back:
            try:
                home.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(moved, home)
            except OSError as err:
                raise OutputError(
                    f"{option}: could not put '{moved}' back to '{home}' ({err.strerror}); {len(done)} file(s) "
                    f"were put back before it (listed in {record}), nothing was deleted"
                ) from None
            done.append((moved, home))
            log.mark(home, moved, "restored")
    finally:
        log.close()
    return done, gone
