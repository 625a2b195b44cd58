"""check-data --near-duplicates: resized, recompressed, cropped copies found across and within splits."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vggft.diagnostics.near_duplicates as near
from conftest import assert_one_line_error, invoke
from descriptor import save_descriptor, scene
from vggft.utils.errors import ConfigError


def _copy(source: Path, target: Path) -> Path:
    """Slightly cropped (a few pixels a side), resized to about 73 %, saved as a quality-50 JPEG."""
    with Image.open(source) as image:
        w, h = image.size
        image.crop((3, 3, w - 4, h - 3)).resize((70, 58)).save(target, quality=50)
    return target


@pytest.fixture
def folder(tmp_path) -> tuple[Path, list[str]]:
    """Sixteen pictures of hues 22.5 degrees apart in train/ and test/, plus: a copy of train/a/h4.jpg in
    test/ (leakage), a copy of train/b/h10.jpg beside it in train/ (a burst), a byte-identical copy of
    train/b/h12.jpg in test/ (an exact duplicate, reported as such). Returns the root and the --set options."""
    root = tmp_path / "data"
    for i in range(16):
        split = "test" if i % 4 == 1 else "train"
        scene(root / split / ("a" if i < 8 else "b") / f"h{i}.jpg", i / 16, seed=i)
    _copy(root / "train" / "a" / "h4.jpg", root / "test" / "a" / "copy.jpg")
    _copy(root / "train" / "b" / "h10.jpg", root / "train" / "b" / "burst.jpg")
    shutil.copy(root / "train" / "b" / "h12.jpg", root / "test" / "b" / "exact.jpg")
    weights = save_descriptor(tmp_path / "descriptor.pth")
    return root, [
        "--set",
        f"data.root={root}",
        "--set",
        f"model.weights={weights}",
        "--set",
        "data.image_size=64",
        "--set",
        "data.resize=72",
    ]


def test_copies_are_found_and_unrelated_pictures_are_not(runner, folder):
    root, options = folder
    result = invoke(runner, "check-data", *options, "--near-duplicates", "-q")
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    start = lines.index("Near-duplicates across splits (cosine >= 0.97; test leakage): 1 group(s)")
    cross, title, within = lines[start + 1 : start + 4]
    assert re.fullmatch(r"  train/a/h4\.jpg ~ test/a/copy\.jpg  \(similarity (0\.99\d|1\.000)\)", cross)
    assert title == "Near-duplicates within a split (cosine >= 0.97): 1 group(s)"
    assert re.fullmatch(r"  train/b/burst\.jpg ~ train/b/h10\.jpg  \(similarity (0\.99\d|1\.000)\)", within)
    assert "  train/b/h12.jpg == test/b/exact.jpg" in lines  # byte-identical: the exact check's, not repeated
    assert lines[-1].startswith("Found: ") and lines[-1].endswith(
        "; 1 group(s) of near-duplicates across splits (test leakage)"
    )
    assert "Extracting near-duplicate features: 19 images" in result.stderr
    # The pooled rows are cached: a second check runs no backbone.
    again = invoke(runner, "check-data", *options, "--near-duplicates", "-q")
    assert again.stdout == result.stdout and "Extracting" not in again.stderr


def test_with_the_cache_off_the_rows_stay_in_memory(runner, folder, tmp_path):
    _, options = folder
    cached = invoke(runner, "check-data", *options, "--near-duplicates", "-q")
    off = invoke(
        runner,
        "check-data",
        *options,
        "--set",
        f"cache.dir={tmp_path / 'off'}",
        "--set",
        "cache.enabled=false",
        "--near-duplicates",
        "-q",
    )
    assert off.exit_code == cached.exit_code == 1 and off.stdout == cached.stdout
    assert "Extracting near-duplicate features: 19 images" in off.stderr
    assert not (tmp_path / "off").exists()  # nothing written


def test_leakage_alone_decides_the_exit_code(runner, folder):
    root, options = folder
    (root / "test" / "a" / "copy.jpg").unlink()
    (root / "test" / "b" / "exact.jpg").unlink()
    result = invoke(runner, "check-data", *options, "--near-duplicates", "-q")
    assert result.exit_code == 0, result.output  # a burst within train is reported, not a failure
    assert "Near-duplicates within a split (cosine >= 0.97): 1 group(s)" in result.stdout
    (root / "train" / "b" / "burst.jpg").unlink()
    result = invoke(runner, "check-data", *options, "--near-duplicates", "-q")
    assert result.exit_code == 0 and "Near-duplicates (cosine >= 0.97): none among 16 readable images" in result.stdout
    assert "Near-duplicates" not in invoke(runner, "check-data", *options, "-q").stdout  # only when asked


def test_similarity_out_of_range_or_alone_is_one_line(runner, folder):
    _, options = folder
    result = invoke(runner, "check-data", *options, "--near-duplicates", "--similarity", "1.5", "-q")
    assert_one_line_error(result, code=2, names=["--similarity", "got 1.5"], fix="above 0 and at most 1")
    result = invoke(runner, "check-data", *options, "--similarity", "0.9", "-q")
    assert_one_line_error(result, code=2, names=["--similarity"], fix="add --near-duplicates")


def test_the_default_similarity_given_alone_is_refused_too(runner, folder):
    """--similarity 0.97 without --near-duplicates does nothing either (it once passed as the default)."""
    _, options = folder
    result = invoke(runner, "check-data", *options, "--similarity", str(near.DEFAULT_SIMILARITY), "-q")
    assert_one_line_error(result, code=2, names=["--similarity"], fix="add --near-duplicates")
    shown = " ".join(invoke(runner, "check-data", "--help").stdout.replace("│", " ").split())
    assert f"links two images (default {near.DEFAULT_SIMILARITY})" in shown


def test_blocks_of_the_similarity_matrix_find_what_the_whole_matrix_finds(monkeypatch):
    g = torch.Generator().manual_seed(0)
    base = torch.rand(12, 8, generator=g)
    rows = torch.cat([base, base[:5] + 0.01 * torch.rand(5, 8, generator=g)])  # 5 planted near pairs
    unit = F.normalize(rows, dim=1)
    whole = unit @ unit.T
    expected = {(i, j) for i in range(len(rows)) for j in range(i + 1, len(rows)) if whole[i, j] >= 0.995}
    monkeypatch.setattr(near, "BLOCK_ELEMENTS", 20)  # one row of the matrix at a time
    pairs, sims = near.similar_pairs(rows, 0.995)
    assert {tuple(p) for p in pairs.tolist()} == expected and len(expected) >= 5
    assert torch.allclose(sims, torch.stack([whole[i, j] for i, j in pairs.tolist()]))
    monkeypatch.setattr(near, "MAX_PAIRS", 3)
    with pytest.raises(ConfigError, match="raise it"):
        near.similar_pairs(rows, 0.995)


def test_groups_are_connected_components_with_their_weakest_link():
    pairs = torch.tensor([[0, 1], [1, 2], [4, 5]])
    groups = near.group_pairs(6, pairs, torch.tensor([0.99, 0.98, 0.975]))
    assert groups == [([0, 1, 2], pytest.approx(0.98)), ([4, 5], pytest.approx(0.975))]
