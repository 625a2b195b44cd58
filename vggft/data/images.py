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
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vggft.config.schema import DataConfig
from vggft.data.folders import SPLITS, DataSplits, not_regular
from vggft.utils.errors import DataError
from vggft.utils.files import atomic_path, file_identity, human_size, save_json
from vggft.utils.logs import log, progress

WHITE = (255, 255, 255)
MAX_ASPECT = 50  # longer side over shorter: Resize(256) of an 80000x1 strip would be 256 x 20,480,000 pixels
MAX_FILE_BYTES = 256 << 20  # no photo is larger; a link to /dev/zero or a disk image is not a photo


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


def _bounded(image: Image.Image) -> None:
    """Refuse a size that would take unbounded memory to decode or resize; a huge JPEG is read reduced
    (draft: 1/2, 1/4 or 1/8 scale, decided before any pixel is decoded) to fit PIL's pixel limit."""
    width, height = image.size
    budget = Image.MAX_IMAGE_PIXELS
    if budget and width * height > budget and image.format == "JPEG":
        scale = next((s for s in (2, 4, 8) if -(-width // s) * -(-height // s) <= budget), None)
        if scale is not None:
            image.draft(image.mode, (width // scale, height // scale))
    problem = size_problem(*image.size)
    if problem:
        raise ImageRefused("unsupported", problem)


def _decode(handle) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked here instead
        with Image.open(handle) as image:
            _bounded(image)
            image.load()
            return to_rgb(image)


def open_rgb(path: str | Path) -> Image.Image:
    """Decode ``path`` (a regular file of a sane size) into an upright 3-channel RGB image."""
    with open_regular(path) as handle:
        return _decode(handle)


def to_rgb(image: Image.Image) -> Image.Image:
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block must not lose an otherwise good picture
        pass
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode != "F" and pixels.max(initial=0) > 255 else 255.0
        if image.mode == "F":
            top = max(float(pixels.max(initial=0)), 1.0)
        gray = np.clip(pixels / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    return image.convert("RGB")


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
