"""Writing files so that a crash never leaves one half-written, and where caches live."""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from vggft.utils.errors import OutputError, first_line


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds.

    A crash, a full disk or an exception inside the block leaves the previous file intact. The
    temporary file has the final name inside a fresh hidden folder, so formats that record their
    own file name (torch.save does) come out byte-identical to a direct write. The folder's name
    carries this host and process id: what a killed writer left behind is removed by the next
    process that writes into the same folder.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path.parent)
        prefix = f".{path.name[:80]}.{_HOST}-{os.getpid()}."  # short enough for any name the file may have
        folder = Path(tempfile.mkdtemp(prefix=prefix, suffix=TEMP_SUFFIX, dir=path.parent))
    except OSError as err:
        if err.errno in DISK_FULL:
            raise OutputError(_disk_full(path)) from None
        raise OutputError(f"{path}: cannot write here ({err.strerror}); choose another output path") from None
    tmp_path = folder / path.name
    try:
        yield tmp_path
        fsync_file(tmp_path)
        os.replace(tmp_path, path)
    except OSError as err:
        if err.errno in DISK_FULL:
            raise OutputError(_disk_full(path, folder)) from None
        raise OutputError(f"{path}: could not be written ({err.strerror}); the previous file is unchanged") from None
    except RuntimeError as err:
        # torch.save's own writer reports a short write (a full disk) as "[enforce fail at
        # inline_container.cc] ... unexpected pos" or "PytorchStreamWriter failed writing file".
        if not any(mark in str(err) for mark in ("inline_container", "PytorchStreamWriter")):
            raise
        if _room(path) >= ROOM_LEFT_WHEN_FULL:  # not the disk: say what torch said, on one line
            raise OutputError(
                f"{path}: could not be written ({first_line(err)}); the previous file is unchanged"
            ) from None
        raise OutputError(_disk_full(path, folder)) from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


TEMP_SUFFIX = ".tmp"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
ROOM_LEFT_WHEN_FULL = 16 << 20  # a write that fails with less free than this (bytes) failed for want of room
_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:40]
_TEMP_NAME = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9_]{0,40})-(?P<pid>\d+)\.[^.]+" + re.escape(TEMP_SUFFIX) + "$")
_swept: set[Path] = set()


def _room(path: Path) -> int:
    try:
        return shutil.disk_usage(existing_parent(path.parent)).free
    except OSError:
        return 0


def _disk_full(path: Path, partial: Path | None = None) -> str:
    """The line for a write the disk had no room for (``partial``, still there, is about to be removed)."""
    free = human_size(_room(path) + (_size(partial) if partial else 0))
    return (
        f"{path}: could not be written (No space left on device: disk full, {free} free there); "
        "free some space or write it elsewhere; the previous file is unchanged"
    )


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary folders that killed writers left in ``folder`` (once per folder and process).

    Only those this host's dead processes wrote: a live writer's, and another machine's on a shared
    disk, are left alone. Returns what was removed.
    """
    folder = Path(os.path.abspath(folder))
    if folder in _swept:
        return []
    _swept.add(folder)
    removed = []
    try:
        entries = [entry for entry in os.scandir(folder) if entry.name.endswith(TEMP_SUFFIX)]
    except OSError:
        return []
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match and match["host"] == _HOST and entry.is_dir(follow_symlinks=False) and not _alive(int(match["pid"])):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's live process (or a pid we cannot judge): never touched
    return True


def fsync_file(path: str | Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def save_torch(obj: Any, path: str | Path, *, sha256: bool = False) -> str | None:
    """``torch.save`` atomically; with ``sha256``, return the SHA-256 of the bytes written. It is read from the
    temporary file before the rename (still in the page cache): what this process wrote, even if another
    writer replaces the file right after. The hashing (CPU) runs on a thread while the fsync (disk) does;
    both end before the rename, so a failure of either leaves the previous file as it was."""
    digest = None
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
        if sha256:
            with ThreadPoolExecutor(1, thread_name_prefix="vggft-hash") as pool:  # leaving it waits for the hash
                hashing = pool.submit(_digest_of, open(tmp, "rb"))
                fsync_file(tmp)  # atomic_path's own fsync then finds nothing left to write
            digest = hashing.result()
    return digest


def file_digest(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read 4 MiB at a time."""
    return _digest_of(open(path, "rb"))


def _digest_of(handle) -> str:
    digest = hashlib.sha256()
    with handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def save_json(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")


def save_text(text: str, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """A CSV written whole or not at all. A file name that is not UTF-8 keeps its own bytes."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8", errors="surrogateescape")
    return Path(path)


def file_identity(path: str | Path) -> list[int]:
    """Size, modification and change times (ns) and inode of ``path`` (OSError if it cannot be stat'ed): what
    keys a cached result about a file. A file rewritten in place with the same size and a restored mtime
    (cp -p, rsync -a) still changes its ctime, so it gets a new key."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def check_folder(folder: str | Path, what: str, fix: str) -> None:
    """Before any work: ``folder`` is a folder that exists or can be made and written (creating nothing)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{what}: '{folder}' is a file, not a folder; {fix}")
    existing = existing_parent(folder)
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{what}: cannot make or write '{folder}' ('{existing}' is not a writable folder); {fix}")


def existing_parent(path: str | Path) -> Path:
    """``path`` itself or its nearest ancestor that exists (where a new file would land)."""
    existing = Path(path).resolve()
    while not existing.exists():
        existing = existing.parent
    return existing


def check_name_length(path: str | Path, key: str, spare: int = 0) -> None:
    """Before any work: refuse a file or folder name longer than its file system allows (``spare``
    bytes kept for what is appended later, such as a run folder's number)."""
    path = Path(path)
    existing = existing_parent(path.parent)
    try:
        limit = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for part in path.parts:
        size = len(os.fsencode(part))
        if size + spare > limit:
            shown = part if len(part) <= 40 else f"{part[:20]}…{part[-12:]}"
            raise OutputError(
                f"{key}: the name '{shown}' is {size} bytes, longer than the file system under "
                f"'{existing}' allows ({limit - spare}); choose a shorter one"
            )


def check_free_space(needs: list[tuple[Path, int, str]]) -> None:
    """Before any work: refuse when the files about to be written, (folder, bytes, config key), will not fit.

    Folders on the same file system add up; a 5% margin covers file-format overhead.
    """
    per_device: dict[int, tuple[Path, int, list[str]]] = {}
    for folder, size, key in needs:
        existing = existing_parent(folder)
        device = existing.stat().st_dev
        where, total, keys = per_device.get(device, (existing, 0, []))
        per_device[device] = (where, total + size, keys + [key])
    for where, total, keys in per_device.values():
        free = shutil.disk_usage(where).free
        if total * 1.05 > free:
            raise OutputError(
                f"{', '.join(keys)}: about {human_size(total)} will be written under '{where}' but only "
                f"{human_size(free)} is free; free some space or point {keys[0]} at another disk"
            )


def human_size(count: float) -> str:
    """1536 -> '2 KiB': the unit that keeps the number readable."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:,.0f} {unit}"
        count /= 1024
    return f"{count:,.0f} TiB"


def cache_root(configured: str | None = None) -> Path:
    """``cache.dir`` if set, else $VGGFT_CACHE, else $XDG_CACHE_HOME/vggft, else ~/.cache/vggft."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("VGGFT_CACHE"):
        return Path(os.environ["VGGFT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vggft"
