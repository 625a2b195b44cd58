"""Reading one image file: a 3-channel RGB picture the right way up, or a reason why not.

Real folders hold zero-byte files, truncated downloads, text files named .jpg,
CMYK and 16-bit files and PNGs with transparency. ``inspect_image`` decodes a
file fully once and returns a verdict; ``open_rgb`` turns any readable file into
upright RGB (alpha composited on white, EXIF orientation applied).
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# torchvision's ImageFolder extensions; anything else (Thumbs.db, notes, .DS_Store) is not an image.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
WHITE = (255, 255, 255)


def is_image_name(path: str | Path) -> bool:
    name = Path(path).name
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def open_rgb(path: str | Path) -> Image.Image:
    """Decode ``path`` into an upright 3-channel RGB image."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)


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
    if isinstance(err, UnidentifiedImageError):
        return "not an image", "no image format recognised"
    text = str(err)
    if isinstance(err, EOFError) or ("truncated" in text.lower() and not isinstance(err, Image.DecompressionBombError)):
        return "truncated", text
    return "unsupported", text


def inspect_image(path: str | Path) -> Verdict:
    """Decode ``path`` completely and say whether it can be trained on."""
    path = Path(path)
    try:
        content = path.read_bytes()
    except OSError as err:
        return Verdict(False, "unreadable", err.strerror or str(err))
    if not content:
        return Verdict(False, "empty", "0 bytes")
    sha1 = hashlib.sha1(content).hexdigest()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's own warnings (EXIF, palette) are not verdicts
            with Image.open(path) as image:
                image.load()
                rgb = to_rgb(image)
    except DECODE_ERRORS as err:
        return Verdict(False, *decode_failure(err), sha1=sha1)
    if rgb.width < 1 or rgb.height < 1:
        return Verdict(False, "unsupported", "zero-sized image", sha1=sha1)
    return Verdict(True, width=rgb.width, height=rgb.height, sha1=sha1)
