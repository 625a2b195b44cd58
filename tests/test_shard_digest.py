"""The feature cache's shards are verified against the digest their index records: a shard edited in place
(same size, every value finite, its mtime put back) is discarded with one note and its rows extracted again,
so eval and train give what the undamaged cache gives. Through the real CLI on the module's cache."""

from __future__ import annotations

import json
import os
import struct
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FAST, ModuleFolder
from vggft.features.cache import FeatureCache


@pytest.fixture(scope="module")
def cached(train_once) -> ModuleFolder:
    """The pet folder trained once (models/VGG16.pt): its cache holds a train shard (12 rows), a test one (7)."""
    folder = train_once("shard_digest")
    folder.train(*FAST)
    return folder


def shard_of(folder: ModuleFolder, rows: int) -> Path:
    """The cache's shard holding ``rows`` rows."""
    (shard,) = [
        shard
        for shard in (folder.root / "cache").glob("features/*/*.pt")
        if len(torch.load(shard, weights_only=True, mmap=True)["keys"]) == rows
    ]
    return shard


def edit_in_place(shard: Path, edit: Callable[[np.ndarray], np.ndarray]) -> None:
    """Rewrite the shard's float rows in place (same size), then put its atime and mtime back."""
    before = shard.stat()
    shape = torch.load(shard, weights_only=True, mmap=True)["features"].shape
    with zipfile.ZipFile(shard) as archive:
        (entry,) = [info for info in archive.infolist() if info.filename.endswith("/data/0")]
    with open(shard, "r+b") as handle:
        handle.seek(entry.header_offset + 26)
        name, extra = struct.unpack("<HH", handle.read(4))
        start = entry.header_offset + 30 + name + extra
        handle.seek(start)
        rows = np.frombuffer(handle.read(shape[0] * shape[1] * 4), dtype="<f4").reshape(shape)
        edited = np.ascontiguousarray(edit(rows.copy()), dtype="<f4")
        assert edited.shape == rows.shape and np.isfinite(edited).all() and not np.array_equal(edited, rows)
        handle.seek(start)
        handle.write(edited.tobytes())
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = shard.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def flip_50_bytes(rows: np.ndarray) -> np.ndarray:
    """The top mantissa bit of 50 non-zero values: each changes by up to half, and stays finite."""
    flat = rows.reshape(-1).view(np.uint8).reshape(-1, 4)
    flat[np.flatnonzero(rows.reshape(-1))[:50], 2] ^= 0x40
    return rows


def discarded(result, shard: Path) -> list[str]:
    return [line for line in result.stderr.splitlines() if f"discarding damaged shard {shard}" in line]


def test_eval_on_a_test_shard_reversed_in_place_says_so_and_scores_what_the_clean_cache_scores(cached):
    scored = ["eval", "--set", f"data.root={cached.pet}", "--json", "-q", "--plots", "plots"]
    clean = cached.run(*scored)  # hashes the test shard: this process remembers it verified
    shard = shard_of(cached, rows=7)
    edit_in_place(shard, lambda rows: rows[::-1])  # same size, finite, mtime put back: the case
    edited = cached.run(*scored)
    (note,) = discarded(edited, shard)
    assert note.endswith("(its bytes differ from the sha256 recorded when it was written); re-extracting")
    assert json.loads(edited.stdout) == json.loads(clean.stdout)


def test_train_on_a_train_shard_with_50_bytes_flipped_says_so_and_trains_the_clean_weights(cached):
    shard = shard_of(cached, rows=12)
    edit_in_place(shard, flip_50_bytes)
    result = cached.run("train", "--set", f"data.root={cached.pet}", "--set", "output.weights=models/again.pt", *FAST)
    assert len(discarded(result, shard)) == 1
    clean, again = (torch.load(cached.root / "models" / name, weights_only=True) for name in ("VGG16.pt", "again.pt"))
    assert clean.keys() == again.keys() and all(torch.equal(clean[k], again[k]) for k in clean)


def test_a_shard_indexed_before_digests_is_trusted_once_then_checked(tmp_path, notes):
    keys = [f"{i:040x}" for i in range(3)]
    FeatureCache(tmp_path, {"t": 1}, 4).add(keys, torch.arange(12.0).reshape(3, 4) + 1)
    (shard,) = tmp_path.glob("features/*/*.pt")
    index = shard.with_suffix(".keys")
    digest, *listed = index.read_text().splitlines()
    assert digest.startswith("sha256:") and listed == keys
    index.write_text("".join(f"{key}\n" for key in keys))  # the keys alone: an index from an earlier vggft
    notes()
    assert all(key in FeatureCache(tmp_path, {"t": 1}, 4) for key in keys) and not notes()
    assert index.read_text().splitlines() == [digest, *keys]  # its digest recorded now
    time.sleep(0.02)  # the edit's ctime a clock tick past the write's: this process's memo must not match
    edit_in_place(shard, lambda rows: rows[::-1])
    assert not any(key in FeatureCache(tmp_path, {"t": 1}, 4) for key in keys)
    assert [line for line in notes() if "discarding damaged shard" in line and "re-extracting" in line]
    assert not shard.exists() and not index.exists()


def test_a_shard_whose_index_is_damaged_is_discarded(tmp_path, notes):
    keys = [f"{i:040x}" for i in range(2)]
    FeatureCache(tmp_path, {"t": 1}, 4).add(keys, torch.ones(2, 4))
    (index,) = tmp_path.glob("features/*/*.keys")
    index.write_text(index.read_text().replace("sha256:", "sha2S6:"))
    notes()
    assert not any(key in FeatureCache(tmp_path, {"t": 1}, 4) for key in keys)
    assert [line for line in notes() if "(its index is damaged); re-extracting" in line]
