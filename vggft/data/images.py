"""Reading image files: a 3-channel RGB picture the right way up, or a reason why not; verdicts cached.

Real folders hold zero-byte files, truncated downloads, text files named .jpg,
CMYK and 16-bit files and PNGs with transparency. ``inspect_image`` decodes a
file fully once and returns a verdict; ``open_rgb`` turns any readable file into
upright RGB (alpha composited on white, EXIF orientation applied). A verdict is cached per
file, keyed by its path, size and modification time, so a second run decodes only what changed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageMode, ImageOps, JpegImagePlugin, UnidentifiedImageError

from vggft.config.schema import DataConfig
from vggft.data.folders import SPLITS, DataSplits, not_regular
from vggft.utils.errors import DataError
from vggft.utils.files import atomic_path, file_identity, human_size, save_json
from vggft.utils.logs import log, progress

WHITE = (255, 255, 255)
MAX_ASPECT = 50  # longer side over shorter: Resize(256) of an 80000x1 strip would be 256 x 20,480,000 pixels
MAX_FILE_BYTES = 256 << 20  # no photo is larger; a link to /dev/zero or a disk image is not a photo
# What one decode may hold at its peak (decode_bytes), judged from the header before any pixel is decoded. A 50 MP
# photo, the largest people fine-tune on, takes 400 MB (4 bytes a pixel as Pillow keeps RGB, twice for an EXIF
# rotation); a 706 KB 9400x9400 16-bit RGBA PNG took 2 GB (now 707 MB: refused). A larger JPEG is read reduced.
MAX_DECODE_BYTES = 512 << 20
# What all decodes of one process hold at once: inspect_all's threads share it (two images at the cap, or many small
# ones, at a time). DataLoader workers are processes: each decodes one image at a time under its own budget, so a
# loader holds at most MAX_DECODE_BYTES x num_workers (plus its batches).
TOTAL_DECODE_BYTES = 2 * MAX_DECODE_BYTES
ALPHA_MODES = ("RGBA", "LA", "PA")


class ImageRefused(ValueError):
    """A file refused before its pixels are decoded; ``reason`` is the verdict's."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def open_regular(path: str | Path, limit: int | None = None):
    """``path`` opened for binary reading if it is a regular file of at most ``limit`` bytes.

    A FIFO, socket or device is refused without reading (O_NONBLOCK: opening a FIFO never waits for a writer;
    fstat of the open file, not of the name, decides, so a swap after a check cannot slip through).
    """
    limit = MAX_FILE_BYTES if limit is None else limit
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    handle = os.fdopen(fd, "rb")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageRefused("not a file", not_regular(st.st_mode))
        if st.st_size > limit:
            raise ImageRefused(
                "too large", f"{human_size(st.st_size)} is too large for an image file (at most {human_size(limit)})"
            )
    except BaseException:
        handle.close()
        raise
    return handle


def size_problem(width: int, height: int) -> str | None:
    """Why an image of this size is refused before decoding (None: it is not)."""
    if width < 1 or height < 1:
        return "zero-sized image"
    if max(width, height) > MAX_ASPECT * min(width, height):
        ratio = max(width, height) // min(width, height)
        return f"extreme aspect ratio {ratio}:1 of a {width}x{height} image; at most {MAX_ASPECT}:1"
    budget = Image.MAX_IMAGE_PIXELS
    if budget and width * height > budget:
        return f"{width}x{height} = {width * height:,} pixels is too many to decode (at most {budget:,})"
    return None


class ByteBudget:
    """At most ``total`` bytes held at once by the decodes of this process; a decode waits until its share is free."""

    def __init__(self, total: int):
        self.total = total
        self.reset()

    def reset(self) -> None:
        """A fresh, unheld budget (a forked child: a DataLoader worker holds none of its parent's decodes)."""
        self.used = 0
        self._free = threading.Condition()

    @contextmanager
    def hold(self, amount: int) -> Iterator[None]:
        amount = min(amount, self.total)
        with self._free:
            self._free.wait_for(lambda: self.used + amount <= self.total)
            self.used += amount
        try:
            yield
        finally:
            with self._free:
                self.used -= amount
                self._free.notify_all()


DECODE_BUDGET = ByteBudget(TOTAL_DECODE_BYTES)
os.register_at_fork(after_in_child=DECODE_BUDGET.reset)


def decode_bytes(image: Image.Image, size: tuple[int, int] | None = None) -> int:
    """The bytes decoding ``image`` (opened, not loaded) at ``size`` and making it RGB holds at its peak.

    Pillow keeps 1 byte a pixel for L, P and 1, 2 for I;16, 4 for I, F, RGB and every other multi-band mode
    (``stored``). to_rgb holds the decoded pixels and then either a rotated copy (EXIF) or what it converts:
    the 4-byte RGB result, plus an RGBA copy for LA/PA/transparent P, plus the pixels as bytes and as float32
    for 16-bit and float modes. RGB is returned as it is.
    """
    width, height = size or image.size
    mode = image.mode
    try:
        info = ImageMode.getmode(mode)
        stored = int(info.typestr[-1]) if len(info.bands) == 1 else 4
    except (KeyError, ValueError):
        stored = 4
    if mode == "RGB":
        work = 0
    elif mode == "RGBA":
        work = 4  # the RGB result; the pixels are their own mask
    elif mode in ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        work = 8
    elif mode.startswith("I;16") or mode in ("I", "F"):
        work = stored + 4
    else:
        work = 4
    return width * height * (stored + max(stored, work))


def _coefficient_bytes(image: Image.Image) -> int:
    """A progressive JPEG's coefficients, which libjpeg holds whole (2 bytes each, per block of every
    component at its own sampling), whatever scale it is read at."""
    if image.format != "JPEG" or not image.info.get("progressive"):
        return 0
    layers = getattr(image, "layer", None) or [("", 1, 1, 0)] * len(image.getbands())
    most = max(h for _, h, _, _ in layers) * max(v for _, _, v, _ in layers)
    return 2 * image.size[0] * image.size[1] * sum(h * v for _, h, v, _ in layers) // most


def _fits(image: Image.Image, size: tuple[int, int], extra: int) -> bool:
    budget = Image.MAX_IMAGE_PIXELS
    return (not budget or size[0] * size[1] <= budget) and decode_bytes(image, size) + extra <= MAX_DECODE_BYTES


def _bounded(image: Image.Image) -> int:
    """The bytes decoding ``image`` will hold, or ImageRefused when that or its pixels are past the limits;
    a JPEG too large is read reduced instead (draft: 1/2, 1/4 or 1/8 scale, the least that fits, decided
    before any pixel is decoded)."""
    width, height = image.size
    extra = _coefficient_bytes(image)
    if image.format == "JPEG" and not _fits(image, image.size, extra):
        scale = next((s for s in (2, 4, 8) if _fits(image, (-(-width // s), -(-height // s)), extra)), None)
        if scale is not None:
            image.draft(image.mode, (max(1, width // scale), max(1, height // scale)))
    problem = size_problem(*image.size)
    if problem:
        raise ImageRefused("unsupported", problem)
    need = decode_bytes(image) + extra
    if need > MAX_DECODE_BYTES:
        width, height = image.size
        raise ImageRefused(
            "unsupported",
            f"{width}x{height} {image.mode} = {human_size(need)} is too much to decode "
            f"(at most {human_size(MAX_DECODE_BYTES)})",
        )
    return need


def _open(handle) -> Image.Image:
    """Image.open; a JPEG past twice PIL's pixel limit (which Image.open refuses) is opened all the same, its
    header only, for _bounded to read it reduced."""
    try:
        return Image.open(handle)
    except Image.DecompressionBombError:
        handle.seek(0)
        if handle.read(3) != b"\xff\xd8\xff":
            raise
        handle.seek(0)
        return JpegImagePlugin.JpegImageFile(handle)


def _decode(handle) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked here instead
        with _open(handle) as image:
            with DECODE_BUDGET.hold(_bounded(image)):
                image.load()
                return to_rgb(image)


def open_rgb(path: str | Path) -> Image.Image:
    """Decode ``path`` (a regular file of a sane size) into an upright 3-channel RGB image."""
    with open_regular(path) as handle:
        return _decode(handle)


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` upright (EXIF orientation, in place) as 8-bit RGB: transparency on white, deeper greys scaled."""
    try:
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of a picture that needs no turn
    except Exception:  # a broken EXIF block must not lose an otherwise good picture
        pass
    if image.mode == "RGB":
        return image
    if image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        rgb = Image.new("RGB", rgba.size, WHITE)
        rgb.paste(rgba, mask=rgba)  # the pixels alpha_composite on opaque white gives, without two RGBA copies
        return rgb
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        return _deep_to_rgb(image)
    return image.convert("RGB")


def _deep_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit (and 32-bit integer) grey scaled by the 16-bit depth, 65535 white, whatever the picture holds:
    a dark frame stays darker than a bright one. Float images carry no depth: their brightest pixel is white."""
    pixels = np.array(image, dtype=np.float32)  # a writable copy, even of F
    top = max(float(pixels.max(initial=0)), 1.0) if image.mode == "F" else 65535.0
    pixels *= 255.0 / top
    np.clip(pixels, 0, 255, out=pixels)
    np.rint(pixels, out=pixels)
    gray = pixels.astype(np.uint8)
    del pixels  # before the RGB result is made: decode_bytes counts one of them at a time
    return Image.fromarray(gray).convert("RGB")


@dataclass(frozen=True)
class Verdict:
    """What one full decode of a file found."""

    ok: bool
    reason: str = ""  # empty, truncated, not an image, unsupported
    detail: str = ""
    width: int = 0
    height: int = 0
    sha1: str = ""

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("ok", "reason", "detail", "width", "height", "sha1")}

    @classmethod
    def from_dict(cls, data: dict) -> Verdict:
        return cls(**data)


DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def decode_failure(err: BaseException) -> tuple[str, str]:
    """(reason, detail) for an exception from decoding an image: not an image, truncated or unsupported."""
    if isinstance(err, ImageRefused):
        return err.reason, str(err)
    if isinstance(err, UnidentifiedImageError):
        return "not an image", "no image format recognised"
    text = str(err)
    if isinstance(err, EOFError) or ("truncated" in text.lower() and not isinstance(err, Image.DecompressionBombError)):
        return "truncated", text
    return "unsupported", text


def inspect_image(path: str | Path) -> Verdict:
    """Decode ``path`` completely and say whether it can be trained on."""
    try:
        with open_regular(path) as handle:
            # Ask for what fstat says is there (plus one byte, to see growth): read(n) allocates n bytes up
            # front, and eight threads asking for the cap each came to 2 GiB under a 4 GiB address limit.
            content = handle.read(min(os.fstat(handle.fileno()).st_size, MAX_FILE_BYTES) + 1)
    except ImageRefused as err:
        return Verdict(False, err.reason, str(err))
    except OSError as err:
        return Verdict(False, "unreadable", err.strerror or str(err))
    if not content:
        return Verdict(False, "empty", "0 bytes")
    if len(content) > MAX_FILE_BYTES:  # it grew after the size was checked
        return Verdict(False, "too large", f"more than {human_size(MAX_FILE_BYTES)}")
    sha1 = hashlib.sha1(content).hexdigest()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's own warnings (EXIF, palette) are not verdicts
            rgb = _decode(io.BytesIO(content))
    except DECODE_ERRORS as err:
        return Verdict(False, *decode_failure(err), sha1=sha1)
    if rgb.width < 1 or rgb.height < 1:
        return Verdict(False, "unsupported", "zero-sized image", sha1=sha1)
    return Verdict(True, width=rgb.width, height=rgb.height, sha1=sha1)


def _stat_key(path: str) -> list[int] | None:
    try:
        return file_identity(path)
    except OSError:
        return None


class VerdictLedger:
    """The image-verdict ledger: a JSON file of {absolute path: [size, mtime_ns, ctime_ns, inode, verdict]} for one
    data root, so an image already decoded is not decoded again while its file is unchanged."""

    def __init__(self, cache_dir: Path | None, root: Path):
        self.path = None
        self.entries: dict[str, list] = {}
        if cache_dir is None:
            return
        digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
        self.path = cache_dir / "images" / f"{root.resolve().name}-{digest}.json"
        try:
            loaded = json.loads(self.path.read_text(encoding="utf-8"))
            if isinstance(loaded, dict):
                self.entries = loaded
        except (OSError, ValueError):
            self.entries = {}  # missing or corrupt: rebuilt from scratch, never trusted

    def get(self, path: str, key: list[int] | None) -> Verdict | None:
        entry = self.entries.get(os.path.abspath(path))
        if key is None or not isinstance(entry, list) or len(entry) != len(key) + 1 or entry[:-1] != key:
            return None
        try:
            verdict = Verdict.from_dict(entry[-1])
        except TypeError:
            return None
        if verdict.ok and size_problem(verdict.width, verdict.height):
            return None  # judged before sizes were checked: decode again (and refuse it)
        return verdict

    def put(self, path: str, key: list[int] | None, verdict: Verdict) -> None:
        if key is not None:
            self.entries[os.path.abspath(path)] = [*key, verdict.to_dict()]

    def save(self) -> None:
        if self.path is not None:
            try:
                save_json(self.entries, self.path)
            except Exception:  # the cache is an optimisation: failing to write it must not fail a run
                pass

    @property
    def bad_list_path(self) -> Path | None:
        return None if self.path is None else self.path.with_suffix(".bad.txt")


def inspect_all(paths: list[str], cache: VerdictLedger, *, fresh: bool = False) -> dict[str, Verdict]:
    """A verdict for every path, decoding only those the cache does not know (all of them if ``fresh``)."""
    verdicts: dict[str, Verdict] = {}
    todo: list[tuple[str, list[int] | None]] = []
    for path in paths:
        key = _stat_key(path)
        cached = None if fresh else cache.get(path, key)
        if cached is not None:
            verdicts[path] = cached
        else:
            todo.append((path, key))
    if todo:
        workers = min(len(todo), os.cpu_count() or 1, 8)
        with ThreadPoolExecutor(workers) as pool:  # Pillow releases the GIL while decoding
            results = pool.map(lambda item: inspect_image(item[0]), todo)
            bar = progress(results, total=len(todo), desc="Checking images", unit="img")
            # One verdict per item; strict would resume the progress generator after the last one.
            for (path, key), verdict in zip(todo, bar, strict=False):
                verdicts[path] = verdict
                cache.put(path, key, verdict)
        cache.save()
    return verdicts


@dataclass
class BadImages:
    files: list[tuple[str, Verdict]] = field(default_factory=list)
    list_path: Path | None = None

    def __len__(self) -> int:
        return len(self.files)

    def lines(self) -> list[str]:
        return [f"{path}\t{v.reason}\t{v.detail}" for path, v in self.files]


def drop_bad_images(splits: DataSplits, data: DataConfig, cache_dir: Path | None) -> tuple[DataSplits, BadImages]:
    """Decode every image once (cached); leave the unreadable out, or stop, per ``data.bad_images``."""
    cache = VerdictLedger(cache_dir, splits.root)
    paths = [path for _, (path, _) in splits.all_samples()]
    verdicts = inspect_all(paths, cache)
    bad = BadImages([(path, verdicts[path]) for path in paths if not verdicts[path].ok])
    if not bad:
        return splits, bad
    bad.list_path = cache.bad_list_path
    if bad.list_path is not None:
        with atomic_path(bad.list_path) as tmp:  # the paths' own bytes, even those that are not UTF-8
            tmp.write_bytes(os.fsencode("\n".join(bad.lines()) + "\n"))
    first_path, first = bad.files[0]
    where = f"; full list: {bad.list_path}" if bad.list_path else ""
    if data.bad_images == "error":
        raise DataError(
            f"{len(bad)} unreadable image(s) under {splits.root} (first: {first_path}: {first.reason})"
            f"{where}; fix or remove them (vggft check-data --quarantine DIR moves them), "
            "or set data.bad_images: skip"
        )
    log.warning(f"Skipping {len(bad)} unreadable image(s) (first: {first_path}: {first.reason}){where}")
    good = {split: [s for s in splits[split] if verdicts[s[0]].ok] for split in SPLITS if split in splits.splits}
    kept = DataSplits(splits.root, splits.layout, splits.class_names, good)
    for split, samples in kept.splits.items():
        present = {label for _, label in samples}
        before = {label for _, label in splits[split]}
        for label in sorted(before - present):
            raise DataError(
                f"{splits.root}: every image of class '{splits.class_names[label]}' in the {split} split "
                f"is unreadable{where}; replace them or remove the class"
            )
    return kept, bad
