"""The fingerprint memo: the frozen prefix's fingerprint remembered between runs.

The feature cache's folder is named by a hash of the frozen prefix's weights: about 470 MB to read for
VGG-16 on every run. A prefix whose every weight came unchanged from one file has the hash of that file's
contents, so it is kept in a small file in the cache folder, keyed by the file's identity (path, size,
modification and change times, inode: a file rewritten in place is a new key) and the prefix's layout.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from vggft.utils.errors import VggftError
from vggft.utils.files import save_text
from vggft.utils.logs import log


def memoised(key: str, folder: Path, compute: Callable[[], str]) -> str:
    """``compute()``, kept under ``folder/fingerprints`` by the hash of ``key`` and read back next time."""
    path = Path(folder) / "fingerprints" / f"{hashlib.sha1(key.encode()).hexdigest()}.txt"
    try:
        known = path.read_text().strip()
        if len(known) == 40 and all(c in "0123456789abcdef" for c in known):
            return known
    except (OSError, UnicodeDecodeError):
        pass
    value = compute()
    try:
        save_text(value, path)
    except VggftError as err:  # a read-only cache still works: it hashes every time
        log.debug(f"Fingerprint not memoised ({err})")
    return value


def holds_every_tensor(path: Path, model: nn.Module, part: nn.Sequential) -> bool:
    """Whether the state_dict file ``path`` has every tensor of ``part`` (layers of ``model``), so that a
    model just built from it took all of them from the file (a backbone-only file leaves some to random init)."""
    names = {id(module): name for name, module in model.named_modules()}
    wanted = {f"{names[id(child)]}.{key}" for child in part for key in child.state_dict()}
    try:  # the keys only: memory-mapped, no tensor is read
        keys = torch.load(path, map_location="cpu", weights_only=True, mmap=True).keys()
    except Exception:  # unreadable, or an old-format file that cannot be mapped: just hash
        return False
    return wanted <= set(keys)
