"""Writing files so that a crash never leaves one half-written, and where caches live."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import OutputError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds.

    A crash, a full disk or an exception inside the block leaves the previous file intact. The
    temporary file has the final name inside a fresh hidden folder, so formats that record their
    own file name (torch.save does) come out byte-identical to a direct write.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as err:
        raise OutputError(f"{path}: cannot write here ({err.strerror}); choose another output path") from None
    tmp_path = folder / path.name
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except OSError as err:
        raise OutputError(f"{path}: could not be written ({err.strerror}); the previous file is unchanged") from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def save_torch(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_json(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")


def save_text(text: str, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def existing_parent(path: str | Path) -> Path:
    """``path`` itself or its nearest ancestor that exists (where a new file would land)."""
    existing = Path(path).resolve()
    while not existing.exists():
        existing = existing.parent
    return existing


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
