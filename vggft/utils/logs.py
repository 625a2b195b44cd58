"""Notes and progress, both on stderr: stdout is kept for a command's result.

Library code logs through ``logging.getLogger("vggft")`` and wraps long loops in ``progress``;
nothing here prints unless the caller (the CLI, or a notebook) asks for it with ``configure``.
In a terminal, progress is a tqdm bar; written to a file (nohup, CI, a cluster's job log) it is a
plain line at most every ``PLAIN_INTERVAL`` seconds (``VGGFT_PROGRESS_SECONDS``) with done/total, percent,
rate and ETA, never hundreds of carriage-return frames. Details a user cannot act on are ``log.debug``,
shown with ``vggft --verbose``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sized
from typing import TypeVar

log = logging.getLogger("vggft")

PLAIN_INTERVAL = float(os.environ.get("VGGFT_PROGRESS_SECONDS", 30))  # between plain progress lines
T = TypeVar("T")

_settings = {"progress": False}


def configure(*, verbose: bool = True, progress: bool = True, details: bool = False) -> None:
    """Send vggft's notes to stderr as bare lines, and turn progress on or off (the CLI calls this);
    ``details``: the debug lines too (``vggft --verbose``)."""
    log.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if details else logging.INFO if verbose else logging.WARNING)
    log.propagate = False
    _settings["progress"] = progress


def silence() -> None:
    """Nothing but errors from this process (another rank of a distributed job speaks for it)."""
    log.setLevel(logging.ERROR)
    _settings["progress"] = False


def progress_enabled() -> bool:
    return _settings["progress"]


def set_progress(enabled: bool) -> None:
    _settings["progress"] = enabled


def progress(iterable: Iterable[T], *, desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """``iterable`` with a progress display that suits where stderr goes (or none)."""
    if not _settings["progress"]:
        yield from iterable
        return
    if total is None and isinstance(iterable, Sized):
        try:
            total = len(iterable)
        except TypeError:  # a __len__ that refuses (a DataLoader over an IterableDataset)
            total = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, file=sys.stderr)
        return
    start = last = time.monotonic()
    for done, item in enumerate(iterable, start=1):
        yield item
        now = time.monotonic()
        if now - last >= PLAIN_INTERVAL:
            last = now
            log.info(plain_line(desc, done, total, unit, now - start))


def plain_line(desc: str, done: int, total: int | None, unit: str, elapsed: float) -> str:
    """'Extracting train features: 64/1437 img (4%), 2.1 img/s, ETA 10m55s' (without a total: count and rate)."""
    rate = done / elapsed if elapsed > 0 else 0.0
    speed = f"{rate:.1f} {unit}/s" if rate >= 1 or rate == 0 else f"{1 / rate:.1f} s/{unit}"
    if not total:
        return f"{desc}: {done} {unit}, {speed}"
    eta = f", ETA {duration((total - done) / rate)}" if rate > 0 and done < total else ""
    return f"{desc}: {done}/{total} {unit} ({100 * done / total:.0f}%), {speed}{eta}"


def duration(seconds: float) -> str:
    """12.3s, 4m05s, 2h03m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Counter:
    """A progress count for work that arrives in chunks (images in batches): ``update(n)`` after each."""

    def __init__(self, *, desc: str, total: int, unit: str = "img"):
        self.desc, self.total, self.unit, self.done = desc, total, unit, 0
        self._bar = None
        self._start = self._last = time.monotonic()
        if _settings["progress"] and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr)

    def update(self, count: int) -> None:
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
        elif _settings["progress"] and time.monotonic() - self._last >= PLAIN_INTERVAL:
            self._last = time.monotonic()
            log.info(plain_line(self.desc, self.done, self.total, self.unit, self._last - self._start))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
