"""Writing files so that a crash never leaves one half-written, and where caches live."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import OutputError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds.

    A crash, a full disk or an exception inside the block leaves the previous file intact.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise OutputError(f"{path}: cannot write here ({err.strerror}); choose another output path") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except OSError as err:
        raise OutputError(f"{path}: could not be written ({err.strerror}); the previous file is unchanged") from None
    finally:
        tmp_path.unlink(missing_ok=True)


def save_torch(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_json(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")


def save_text(text: str, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def cache_root(configured: str | None = None) -> Path:
    """``cache.dir`` if set, else $VGGFT_CACHE, else $XDG_CACHE_HOME/vggft, else ~/.cache/vggft."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("VGGFT_CACHE"):
        return Path(os.environ["VGGFT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vggft"
