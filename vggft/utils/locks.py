"""One process at a time: advisory locks (``flock``) on what two vggft commands must not both write.

``output_lock``: ``<file>.lock`` beside a file a run writes (``output.weights``, a resumed ``last.pt``), holding
the pid of the process that holds it; ``folder_lock``: a folder itself (``data.root``, while files are moved out
of it). A second process is refused at once, in one line, before any work. The operating system drops a lock
when its process ends, however it ends: a killed run leaves no stale lock (at most a ``.lock`` file that the next
run takes over). Where there is nothing to lock with (Windows has no ``flock``; a file system without locks), the
command runs unlocked, as before.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from vggft.utils.errors import OutputError

if sys.platform != "win32":
    import fcntl

LOCK_SUFFIX = ".lock"


@contextlib.contextmanager
def output_lock(path: str | Path, key: str, fix: str, *, enabled: bool = True) -> Iterator[None]:
    """Hold ``<path>.lock`` for the block (its folder made if missing, and removed again if left empty). Another
    process holding it: OutputError naming ``key``, ``path``, that process and ``fix``. ``enabled`` False (the
    ranks of a torchrun job other than 0, which write nothing): a plain block."""
    if not enabled or sys.platform == "win32":  # no flock on Windows: runs there are not locked
        yield
        return
    lock = Path(f"{path}{LOCK_SUFFIX}")
    made = _make_folders(lock.parent)
    fd = None
    try:
        fd = _acquire(lock, key, fix, Path(path))
        yield
    finally:
        if fd is not None:
            _release(lock, fd)
        for folder in reversed(made):  # made for the lock alone: nothing was written into it
            with contextlib.suppress(OSError):
                folder.rmdir()


@contextlib.contextmanager
def folder_lock(folder: str | Path, busy: str) -> Iterator[None]:
    """Hold a lock on ``folder`` itself for the block; another process holding it: OutputError(``busy`` and,
    where the system says, that process's pid). A folder that cannot be opened: a plain block (the command's
    own checks say why)."""
    if sys.platform == "win32":  # no flock on Windows: moves there are not locked
        yield
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _flock_holder(fd)
            raise OutputError(busy.format(who=f"pid {pid}" if pid else "another process")) from None
        except OSError:
            pass  # a file system without locks: unlocked, as before
        yield
    finally:
        os.close(fd)


def _acquire(lock: Path, key: str, fix: str, path: Path) -> int | None:
    """The descriptor of ``lock``, flock'ed and holding this process's pid; None where it cannot be locked."""
    for _ in range(10):  # another process removed the file as this one opened it: lock the new one
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return None  # the run's own checks say why its output cannot be written
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd) or f"pid {_flock_holder(fd) or '?'}"
            os.close(fd)
            raise OutputError(
                f"{key}: '{path}' is being written by another vggft process ({holder}; lock file '{lock}'); "
                f"wait for it to end, or {fix}"
            ) from None
        except OSError:
            os.close(fd)
            return None  # a file system without locks: unlocked, as before
        if _is_file_at(fd, lock):
            with contextlib.suppress(OSError):  # a full disk: held all the same, without naming its holder
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
            return fd
        os.close(fd)
    return None


def _release(lock: Path, fd: int) -> None:
    """Remove the lock file (while it is still held: no other process can have locked a file of that name),
    then let the lock go."""
    try:
        if _is_file_at(fd, lock):
            lock.unlink()
    except OSError:
        pass
    finally:
        os.close(fd)


def _is_file_at(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 300, 0).decode(errors="replace").strip()
    except OSError:
        return ""


def _flock_holder(fd: int) -> int | None:
    """The pid holding a flock on ``fd``'s file, from /proc/locks (Linux); None where it cannot be told."""
    st = os.fstat(fd)
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as handle:
            for line in handle:
                fields = line.split()
                if "FLOCK" in fields and where in fields and "->" not in fields:
                    return int(fields[fields.index(where) - 1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _make_folders(folder: Path) -> list[Path]:
    """Make ``folder`` and its missing parents; the ones made, outermost first (as far as they could be made)."""
    missing: list[Path] = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    made = []
    for path in reversed(missing):
        try:
            path.mkdir()
        except OSError:
            break
        made.append(path)
    return made


@contextlib.contextmanager
def train_locks(weights: str | Path, resume: str | Path | None, *, enabled: bool = True) -> Iterator[None]:
    """What a training run writes, one run at a time: ``output.weights`` with its sidecar, and a resumed run's
    folder (through its ``last.pt``; a new run folder is made by mkdir, which one process alone succeeds at)."""
    with output_lock(weights, "output.weights", "choose another path with --set output.weights=PATH", enabled=enabled):
        if resume is None:
            yield
            return
        with output_lock(resume, "--resume", "start a new run instead of resuming this one", enabled=enabled):
            yield
