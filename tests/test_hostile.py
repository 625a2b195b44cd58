"""Hostile data folders, with the real thing: strips of 1x400000 pixels, self-links and link loops, a FIFO named
p.jpg, a link to /dev/zero, class folders whose names are not UTF-8, and settings too small for VGG."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from conftest import FAST, assert_one_line_error, deadline, invoke, make_folder, make_image, tiny_subprocess_env
from vggft.config.schema import DataConfig
from vggft.data.folders import find_splits, images_in
from vggft.data.images import DECODE_ERRORS, Verdict, VerdictLedger, drop_bad_images, inspect_image, open_rgb
from vggft.data.loaders import make_loader
from vggft.model.inference import collect_images


def strip_png(path: Path, size=(1, 400_000)) -> Path:
    """A PNG of a few kilobytes that Resize(256) would turn into 256 x 102,400,000 pixels (78 GB)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 60, 40)).save(path)
    return path


# ---- item 7: extreme aspect ratios and huge images -------------------------------------------------------


def test_extreme_aspect_ratio_is_refused_in_the_verdict_and_at_decode(tmp_path):
    for size in ((80_000, 1), (1, 80_000)):
        path = strip_png(tmp_path / f"{size[0]}x{size[1]}.png", size)
        assert path.stat().st_size < 2_000  # tiny on disk, within PIL's decompression-bomb limit
        verdict = inspect_image(path)
        assert not verdict.ok and verdict.reason == "unsupported"
        assert "extreme aspect ratio 80000:1" in verdict.detail, verdict
        with pytest.raises(DECODE_ERRORS, match="extreme aspect ratio"):
            open_rgb(path)
    wide = make_image(tmp_path / "panorama.jpg", (90, 90, 90), size=(400, 10))  # 40:1 is still a picture
    assert inspect_image(wide).ok and open_rgb(wide).size == (400, 10)


def test_a_huge_jpeg_is_read_reduced_and_other_huge_formats_refused(tmp_path, monkeypatch):
    """Past PIL's pixel limit a JPEG is decoded at 1/2..1/8 scale (draft), others are refused before decoding."""
    jpeg = make_image(tmp_path / "big.jpg", (20, 200, 20), size=(200, 160))
    png = make_image(tmp_path / "big.png", (20, 200, 20), size=(200, 160))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # 32,000 pixels: over it, under PIL's own 2x error
    assert open_rgb(jpeg).size == (100, 80)
    assert inspect_image(jpeg).ok and (inspect_image(jpeg).width, inspect_image(jpeg).height) == (100, 80)
    verdict = inspect_image(png)
    assert not verdict.ok and "200x160 = 32,000 pixels is too many to decode" in verdict.detail


def test_a_cached_readable_verdict_of_a_strip_is_not_trusted(tmp_path):
    """A verdict cache written before sizes were checked says 'ok' about the strip: it is decoded again."""
    root = make_folder(tmp_path / "pet", {"train": {"cat": 2, "dog": 2}, "test": {"cat": 1, "dog": 1}})
    strip = strip_png(root / "train" / "cat" / "strip.png")
    cache_dir = tmp_path / "cache"
    old = VerdictLedger(cache_dir, root)
    old.put(str(strip), _stat(strip), Verdict(True, width=1, height=400_000, sha1="x"))
    old.save()
    data = DataConfig(root=str(root))
    splits, bad = drop_bad_images(find_splits(data), data, cache_dir)
    assert [path for path, _ in bad.files] == [str(strip)]
    assert str(strip) not in [path for path, _ in splits["train"]]


def _stat(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


CHILD = """
import resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from vggft.cli import app
for args in ({train!r}, {predict!r}):
    try:
        app(args, prog_name="vggft")
    except SystemExit as done:
        if done.code:
            raise
print("peak_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_train_and_predict_skip_a_strip_under_a_memory_limit(tmp_path):
    """The 1x400000 PNG is left out of training and gets an error row in predict, in a process whose address
    space is capped at 12 GiB (the old code asked Resize(256) for 78 GB: a MemoryError traceback)."""
    root = make_folder(tmp_path / "pet", {"train": {"cat": 4, "dog": 4}, "test": {"cat": 2, "dog": 2}})
    strip_png(root / "train" / "cat" / "strip.png")
    strip_png(root / "test" / "dog" / "strip.png")
    train = ["train", "--set", f"data.root={root}", *FAST, "--set", "data.resize=256", "--set", "output.weights=m.pt"]
    predict = ["predict", "-w", "m.pt", str(root / "test"), "--csv", "p.csv"]
    script = CHILD.format(train=train, predict=predict)
    done = subprocess.run(
        [sys.executable, "-c", script, str(12 << 30)],
        capture_output=True,
        text=True,
        env=tiny_subprocess_env(),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Skipping 2 unreadable image(s)" in done.stderr and "Traceback" not in done.stderr
    rows = list(csv.DictReader(open(tmp_path / "p.csv", encoding="utf-8")))
    errors = {Path(r["path"]).name: r["error"] for r in rows if r["error"]}
    assert list(errors) == ["strip.png"] and "extreme aspect ratio 400000:1" in errors["strip.png"]
    assert len({r["path"] for r in rows}) == 5  # the four test images scored too
    peak_kb = int(done.stdout.split("peak_kb")[1])
    assert peak_kb < 3 << 20, f"peak RSS {peak_kb} kB"


# ---- item 8: links, loops, FIFOs and devices in a data folder ----------------------------------------------


def test_two_self_links_walk_each_folder_once(tmp_path, notes):
    """`ln -s . cat/a; ln -s . cat/b`: os.walk(followlinks=True) walked about 2^40 paths."""
    root = make_folder(tmp_path / "pool", {"": {"cat": 4, "dog": 4}})
    os.symlink(".", root / "cat" / "a")
    os.symlink(".", root / "cat" / "b")
    with deadline(20):  # the 2^40 paths never end
        splits = find_splits(DataConfig(root=str(root), split=[0.5, 0.0, 0.5]))
    paths = [path for _, (path, _) in splits.all_samples()]
    assert len(paths) == 8 and len({os.path.realpath(p) for p in paths}) == 8
    assert all("/a/" not in p and "/b/" not in p for p in paths)  # listed under their real folder
    said = [line for line in notes() if line.startswith("Left out")]
    assert len(said) == 1 and "Left out 2 path(s)" in said[0] and "leads back to a folder already walked" in said[0]


def test_a_loop_link_does_not_multiply_samples(tmp_path, notes):
    """One `cat/loop -> .` turned 8 training images into 328 samples."""
    root = make_folder(tmp_path / "pet", {"train": {"cat": 4, "dog": 4}, "test": {"cat": 1, "dog": 1}})
    os.symlink(".", root / "train" / "cat" / "loop")
    os.symlink("..", root / "train" / "dog" / "up")  # back to train/: the dog class would hold the cats
    os.symlink("../dog", root / "train" / "cat" / "dogs")  # another class's folder: walked once, as dog
    elsewhere = make_folder(tmp_path / "extra", {"": {"cat": 2}})
    os.symlink(elsewhere / "cat", root / "train" / "cat" / "more")  # a link to new images is still followed
    with deadline(20):
        splits = find_splits(DataConfig(root=str(root)))
    labels = [label for _, label in splits["train"]]
    assert (labels.count(0), labels.count(1)) == (6, 4)
    assert "Left out 3 path(s)" in " ".join(notes())


def test_fifo_and_dev_zero_are_never_read(tmp_path, notes):
    cat = make_folder(tmp_path / "pool", {"": {"cat": 3, "dog": 3}}) / "cat"
    os.mkfifo(cat / "p.jpg")
    os.symlink("/dev/zero", cat / "z.jpg")
    with deadline(10):
        found = images_in(cat)
        assert [Path(p).name for p in found] == ["cat.0.jpg", "cat.1.jpg", "cat.2.jpg"]
        assert "Left out 2 path(s)" in notes()[0]
        # Named directly, they are refused without a read (open() of a FIFO would wait for a writer forever).
        for name, kind in (("p.jpg", "a FIFO"), ("z.jpg", "a character device")):
            verdict = inspect_image(cat / name)
            assert (verdict.ok, verdict.reason) == (False, "not a file") and kind in verdict.detail
            with pytest.raises(DECODE_ERRORS, match="not a regular file"):
                open_rgb(cat / name)
        assert collect_images([cat / "p.jpg", cat / "cat.0.jpg"]) == [str(cat / "cat.0.jpg"), str(cat / "p.jpg")]


def test_an_oversized_file_is_refused_by_size_before_reading(tmp_path, monkeypatch):
    import vggft.data.images as images

    path = make_image(tmp_path / "x.jpg", (1, 2, 3), size=(64, 64))
    monkeypatch.setattr(images, "MAX_FILE_BYTES", 100)
    verdict = inspect_image(path)
    assert (verdict.ok, verdict.reason) == (False, "too large") and "at most 100 bytes" in verdict.detail


def test_check_data_on_a_hostile_folder_finishes(tmp_path):
    """The real CLI in processes of their own (a blocked FIFO read is killed by the timeout, /dev/zero by a
    4 GiB address-space cap): self-links, a loop, a FIFO, a socket, a link to /dev/zero."""
    import socket

    root = make_folder(tmp_path / "pet", {"train": {"cat": 4, "dog": 4}, "test": {"cat": 2, "dog": 2}})
    cat = root / "train" / "cat"
    os.symlink(".", cat / "a")
    os.symlink(".", cat / "b")
    os.symlink("..", cat / "up")
    os.mkfifo(cat / "p.jpg")
    os.symlink("/dev/zero", cat / "z.jpg")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(cat / "s.jpg"))
    try:

        def vggft(*args):
            limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30)); "
            code = limit + "from vggft.cli import run; run()"
            return subprocess.run(
                [sys.executable, "-c", code, *args],
                capture_output=True,
                text=True,
                env=tiny_subprocess_env(),
                timeout=60,
                cwd=tmp_path,
            )

        done = vggft("check-data", "--set", f"data.root={root}")
        assert done.returncode == 0, done.stderr[-2000:]
        assert "No problems found." in done.stdout and re.search(r"train +cat +4 +0", done.stdout)
        assert "Left out 6 path(s)" in done.stderr
    finally:
        server.close()


# ---- item 3: class folders whose names are not UTF-8 -----------------------------------------------------


def test_a_latin1_class_folder_trains_evaluates_predicts_and_checks(runner, tmp_path):
    root = make_folder(tmp_path / "pet", {"train": {"cat": 4, "dog": 4}, "test": {"cat": 2, "dog": 2}})
    for split in ("train", "test"):
        os.rename(os.fsencode(root / split / "cat"), os.fsencode(root / split) + b"/caf\xe9")
    result = invoke(runner, "train", "--set", f"data.root={root}", *FAST, "--set", "output.weights=m.pt")
    assert result.exit_code == 0, result.output
    sidecar = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))
    assert sidecar["class_names"] == ["caf\\xe9", "dog"]  # printable; the files keep their real names
    for cache in ("on", "off"):  # off: the confusion PNG is drawn from decoded images, labels by matplotlib
        result = invoke(runner, "eval", "-w", "m.pt", "--set", f"cache={cache}", "--misclassified", "4", "-q")
        assert result.exit_code == 0, result.output
        assert "caf\\xe9" in result.stdout and (tmp_path / "m.confusion_test.png").is_file()
    result = invoke(runner, "predict", "-w", "m.pt", root / "test", "--csv", "p.csv")
    assert result.exit_code == 0, result.output
    raw = (tmp_path / "p.csv").read_bytes()
    assert b"/caf\xe9/cat.0.jpg,1," in raw and b",caf\\xe9," in raw  # the path's own bytes; a printable label
    rows = list(csv.reader(raw.decode("utf-8", "surrogateescape").splitlines()))
    assert all(os.path.isfile(r[0]) for r in rows[1:])  # every path in the CSV opens the file it names
    result = invoke(runner, "check-data", "--set", f"data.root={root}")
    assert result.exit_code == 0 and "caf\\xe9" in result.stdout and "No problems found." in result.stdout


# ---- items 4 and 5: sizes too small for VGG, worker counts ----------------------------------------------


@pytest.mark.parametrize("command", ["train", "summary"])
@pytest.mark.parametrize(
    "override, names, fix",
    [
        ("data.image_size=16", ["data.image_size", "16"], "32 or more"),
        ("data.resize=40", ["data.resize", "40", "data.image_size 224"], "set resize to 224 or more"),
        ("data.num_workers=-1", ["data.num_workers", "-1"], "'auto' or a number of 0 or more"),
    ],
)
def test_settings_vgg_cannot_run_are_one_config_line(runner, pet, command, override, names, fix):
    result = invoke(runner, command, "--set", f"data.root={pet}", "--set", override)
    assert_one_line_error(result, code=2, names=names, fix=fix)


def test_a_setting_vgg_cannot_run_stops_train_before_any_work(runner, pet):
    result = invoke(runner, "train", "--set", f"data.root={pet}", "--set", "data.image_size=16")
    assert result.exit_code == 2
    assert not Path("runs").exists() and not Path("models").exists()


def test_loader_workers_are_capped_at_the_batches():
    """64 workers for 26 images were 64 processes; one batch needs no worker at all."""
    data = TensorDataset(torch.zeros(26, 1))
    cpu = torch.device("cpu")
    assert make_loader(data, 13, device=cpu, num_workers=64).num_workers == 2
    assert make_loader(data, 32, device=cpu, num_workers=64).num_workers == 0
    assert make_loader(data, 4, device=cpu, num_workers=2).num_workers == 2
