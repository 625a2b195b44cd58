"""Real, dirty image folders: bad files, odd modes, layouts, the pool split, leakage, imbalance."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

import vggft.data.images
from conftest import FAST, assert_one_line_error, invoke, make_folder, make_image
from vggft.config.loading import load_config
from vggft.config.schema import DataConfig
from vggft.data.folders import find_splits
from vggft.data.images import inspect_image, open_rgb
from vggft.utils.errors import DataError


def plant_bad_files(folder: Path) -> dict[str, str]:
    """One of each kind of bad file found in real downloads; returns {name: expected reason}."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(good, format="JPEG")
    (folder / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (folder / "notes.jpg").write_text("this is a text file with a .jpg name\n")
    (folder / "Thumbs.db").write_bytes(b"\x00" * 100)  # not an image by extension: ignored silently
    (folder / ".DS_Store").write_bytes(b"\x00" * 10)
    (folder / "readme.txt").write_text("ignored")
    return {"empty.jpg": "empty", "truncated.jpg": "truncated", "notes.jpg": "not an image"}


def test_each_bad_kind_gets_its_reason(tmp_path):
    expected = plant_bad_files(tmp_path)
    for name, reason in expected.items():
        verdict = inspect_image(tmp_path / name)
        assert not verdict.ok and verdict.reason == reason, (name, verdict)


def test_odd_images_become_upright_rgb(tmp_path):
    cmyk = make_image(tmp_path / "cmyk.jpg", (200, 30, 30), mode="CMYK")
    gray = make_image(tmp_path / "gray.jpg", (90, 90, 90), mode="L")
    png_named_jpg = make_image(tmp_path / "really_png.jpg", (30, 30, 200), fmt="PNG")
    for path in (cmyk, gray, png_named_jpg):
        image = open_rgb(path)
        assert image.mode == "RGB" and inspect_image(path).ok
    assert open_rgb(cmyk).getpixel((20, 16))[0] > 120  # red stays red, not inverted
    # Transparent pixels composite on white, not on whatever colour hides under alpha 0.
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.save(tmp_path / "clear.png")
    assert open_rgb(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "pal.png", transparency=0)
    assert open_rgb(tmp_path / "pal.png").getpixel((0, 0)) == (255, 255, 255)
    deep = Image.new("I;16", (8, 8), 65535)
    deep.save(tmp_path / "deep.png")
    assert open_rgb(tmp_path / "deep.png").getpixel((0, 0)) == (255, 255, 255)
    # EXIF orientation 6 (rotate 90° clockwise to view): a 40x20 file shows as 20x40.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20), (1, 2, 3)).save(tmp_path / "rot.jpg", exif=exif)
    assert open_rgb(tmp_path / "rot.jpg").size == (20, 40)


def test_hidden_and_system_folders_never_become_classes(tmp_path):
    root = make_folder(tmp_path / "d", {"train": {"cat": 2, "dog": 2}, "test": {"cat": 1, "dog": 1}})
    make_image(root / "train" / ".ipynb_checkpoints" / "x.jpg", (1, 1, 1))
    make_image(root / "train" / "__MACOSX" / "y.jpg", (1, 1, 1))
    make_image(root / "train" / "cat" / ".hidden" / "z.jpg", (1, 1, 1))
    (root / "train" / "dog" / "Thumbs.db").write_bytes(b"x")
    splits = find_splits(DataConfig(root=str(root)))
    assert splits.class_names == ["cat", "dog"] and len(splits["train"]) == 4


@pytest.mark.parametrize("val_name", ["val", "valid", "validation"])
def test_val_folder_names(tmp_path, val_name):
    root = make_folder(
        tmp_path / "d", {"train": {"cat": 2, "dog": 2}, val_name: {"cat": 1, "dog": 1}, "test": {"cat": 1, "dog": 1}}
    )
    assert len(find_splits(DataConfig(root=str(root)))["val"]) == 2


def test_layout_errors_before_any_work(runner, tmp_path):
    root = make_folder(tmp_path / "d", {"train": {"cat": 2, "dog": 2}, "test": {"cat": 1, "owl": 1}})
    result = invoke(runner, "train", "--set", f"data.root={root}", "-q")
    assert_one_line_error(
        result,
        code=3,
        after_notes=True,
        names=[f"{root}/test/owl", "'owl'", "classes: cat, dog"],
        fix="add train/owl or remove test/owl",
    )
    (root / "test" / "owl" / "owl.0.jpg").unlink()
    (root / "test" / "owl").rmdir()
    (root / "train" / "owl").mkdir()
    result = invoke(runner, "train", "--set", f"data.root={root}", "-q")
    assert_one_line_error(
        result,
        code=3,
        after_notes=True,
        names=[f"{root}/train/owl", "empty class folder"],
        fix="add images or remove the folder",
    )
    only_test = make_folder(tmp_path / "t", {"test": {"cat": 1, "dog": 1}})
    result = invoke(runner, "train", "--set", f"data.root={only_test}", "-q")
    assert_one_line_error(result, code=3, names=[str(only_test), "no train/ folder"], fix="vggft eval")
    assert not Path("models").exists()


def test_pool_split_is_deterministic_and_stratified(tmp_path):
    root = make_folder(tmp_path / "pool", {"": {"cat": 30, "dog": 10}})
    data = DataConfig(root=str(root), split=[0.8, 0.1, 0.1], split_seed=3)
    first, second = find_splits(data), find_splits(data)
    assert first.splits == second.splits
    labels = {split: [label for _, label in first[split]] for split in ("train", "val", "test")}
    assert (labels["test"].count(0), labels["test"].count(1)) == (3, 1)
    assert (labels["val"].count(0), labels["val"].count(1)) == (3, 1)
    assert (labels["train"].count(0), labels["train"].count(1)) == (24, 8)
    everything = [p for s in first.splits.values() for p, _ in s]
    assert len(everything) == len(set(everything)) == 40
    other = find_splits(DataConfig(root=str(root), split_seed=4))
    assert other["test"] != first["test"]


def _test_files(split: dict) -> list[str]:
    return sorted(split["test"])


def test_a_pool_split_belongs_to_its_run_and_weights(runner, tmp_path):
    """The split is stored in the sidecar and in the run's checkpoints: eval of the weights or of best.pt, and
    --resume, use the files that run held out, whatever other runs or new images did since."""
    root = make_folder(tmp_path / "pool", {"": {"cat": 10, "dog": 10}})
    args = ["--set", f"data.root={root}", "--set", "data.split=[0.6, 0.2, 0.2]", *FAST]
    assert invoke(runner, "train", *args, "--set", "train.epochs=1", "--name", "x").exit_code == 0
    split = json.loads(Path("models/VGG16.json").read_text())["split"]
    assert len(split["test"]) == 4 and len(split["train"]) == 12 and not Path("models/VGG16.split.json").exists()
    # New files land in the pool after training: a fresh split would differ, the record keeps eval honest.
    for i in range(7):
        make_image(root / "cat" / f"new.{i}.jpg", (200, 60, 40), seed=100 + i)
    result = invoke(runner, "eval", "--weights", "models/VGG16.pt", "-q")
    assert result.exit_code == 0 and result.stdout.splitlines()[0].endswith("/4)")
    # Another run with another seed writes its own split beside its own weights...
    other = ["--set", "data.split_seed=1", "--set", "output.weights=models/y.pt", "--name", "y"]
    assert invoke(runner, "train", *args, *other).exit_code == 0
    assert _test_files(json.loads(Path("models/y.json").read_text())["split"]) != _test_files(split)
    # ...and run x goes on with, and its best.pt scores, x's own held-out files.
    result = invoke(runner, "eval", "--weights", "runs/x/best.pt", "-q")
    assert result.exit_code == 0 and result.stdout.splitlines()[0].endswith("/4)")
    assert invoke(runner, "train", "--resume", "runs/x/last.pt", "-q").exit_code == 0
    assert _test_files(json.loads(Path("models/VGG16.json").read_text())["split"]) == _test_files(split)
    assert _test_files(torch.load("runs/x/last.pt", weights_only=True)["split"]) == _test_files(split)


def test_check_data_reports_and_quarantines(runner, tmp_path):
    root = make_folder(tmp_path / "d", {"train": {"cat": 3, "dog": 3}, "test": {"cat": 2, "dog": 2}})
    expected = plant_bad_files(root / "train" / "cat")
    leaked = root / "test" / "dog" / "leak.jpg"
    leaked.write_bytes((root / "train" / "dog" / "dog.0.jpg").read_bytes())
    twin = root / "train" / "cat" / "twin.jpg"
    twin.write_bytes((root / "train" / "cat" / "cat.0.jpg").read_bytes())
    result = invoke(runner, "check-data", "--set", f"data.root={root}", "-q")
    assert result.exit_code == 1
    out = result.stdout
    assert "train  cat         4     3" in out  # 3 + twin usable, 3 bad
    for name, reason in expected.items():
        assert f"train/cat/{name}\t{reason}" in out
    assert "Thumbs.db" not in out and "readme" not in out
    assert "Duplicates across splits (test leakage): 1 group(s)" in out
    assert "train/dog/dog.0.jpg == test/dog/leak.jpg" in out
    assert "Duplicates within a split: 1 group(s)" in out
    assert "Image sizes: width 40-40" in out and "Class balance (train)" in out
    before = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    quarantine = tmp_path / "q"
    result = invoke(runner, "check-data", "--set", f"data.root={root}", "--quarantine", quarantine, "-q")
    assert "Moved 3 unreadable file(s)" in result.stdout
    moved = sorted(p.relative_to(quarantine) for p in quarantine.rglob("*") if p.is_file())
    assert moved == sorted(Path("train/cat") / n for n in expected)
    after = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert sorted(after + moved) == before  # moved, nothing deleted
    leaked.unlink()
    twin.unlink()
    result = invoke(runner, "check-data", "--set", f"data.root={root}", "-q")
    assert result.exit_code == 0 and "No problems found." in result.stdout


def test_train_skips_bad_files_and_says_so_once(runner, pet):
    plant_bad_files(pet / "train" / "dog")
    result = invoke(runner, "train", "--set", f"data.root={pet}", *FAST)
    assert result.exit_code == 0, result.output
    skipped = [line for line in result.stderr.splitlines() if line.startswith("Skipping")]
    assert len(skipped) == 1 and skipped[0].startswith("Skipping 3 unreadable image(s)")
    listing = Path(skipped[0].split("full list: ")[1])
    assert len(listing.read_text().splitlines()) == 3
    result = invoke(runner, "train", "--set", f"data.root={pet}", "--set", "data.bad_images=error", *FAST)
    assert_one_line_error(
        result, code=3, after_notes=True, names=["3 unreadable image(s)", str(pet)], fix="data.bad_images: skip"
    )  # no epoch: nothing on stdout


def test_verdicts_are_cached_by_path_size_and_mtime(pet, monkeypatch):
    calls = []
    real = vggft.data.images.inspect_image
    monkeypatch.setattr(vggft.data.images, "inspect_image", lambda p: calls.append(p) or real(p))
    cfg = load_config(None, [f"data.root={pet}"])
    from vggft.data import prepare_data

    prepare_data(cfg)
    assert len(calls) == 19
    calls.clear()
    prepare_data(cfg)
    assert calls == []
    make_image(pet / "train" / "cat" / "cat.0.jpg", (0, 0, 0), seed=99)  # changed content and size
    prepare_data(cfg)
    assert [Path(p).name for p in calls] == ["cat.0.jpg"]
    # Rewritten in place with the same size and the old mtime restored (cp -p, rsync -a): decoded again.
    calls.clear()
    victim = pet / "train" / "dog" / "dog.0.jpg"
    stat = victim.stat()
    victim.write_bytes(b"\xff" * stat.st_size)
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert victim.stat().st_size == stat.st_size and victim.stat().st_mtime_ns == stat.st_mtime_ns
    splits, bad = prepare_data(cfg)
    assert [Path(p).name for p in calls] == ["dog.0.jpg"] and [Path(p).name for p, _ in bad.files] == ["dog.0.jpg"]


@pytest.mark.parametrize("balance", ["weights", "sampler"])
def test_balance_options_train(runner, tmp_path, balance):
    root = make_folder(tmp_path / "d", {"train": {"cat": 8, "dog": 2}, "test": {"cat": 2, "dog": 2}})
    result = invoke(runner, "train", "--set", f"data.root={root}", "--set", f"data.balance={balance}", *FAST)
    assert result.exit_code == 0, result.output


def test_find_splits_missing_root():
    with pytest.raises(DataError, match="data.root: 'nowhere' not found"):
        find_splits(DataConfig(root="nowhere"))
