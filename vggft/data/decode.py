"""Decoding for feature extraction: Pillow in the DataLoader workers, or JPEG batches decoded on the device.

On a GPU a frozen VGG forward outruns Pillow by an order of magnitude, so the first (uncached) pass is
decode-bound. With ``data.decode: gpu`` the workers only read file bytes; each batch of JPEGs is decoded
by ``torchvision.io.decode_jpeg`` on the device (nvJPEG on CUDA, libjpeg-turbo on the CPU) and resized,
cropped and normalised there as tensors. A file the batched decoder cannot take as it is (not a JPEG,
CMYK, progressive, 12-bit, EXIF-rotated, too large to decode whole, or rejected by the decoder) goes through
Pillow instead, exactly as ``data.decode: pil`` would treat it (a huge JPEG read reduced); each such fallback
is counted and the count is logged once.

Tensor resizing rounds slightly differently from Pillow's, so features differ a little between the two
paths: the resolved path is part of the feature-cache key (``resolve_decode``).

``data.decode: draft`` is Pillow with JPEGs decoded at the size they are needed: libjpeg's DCT scaling
(``Image.draft``) reads a JPEG at 1/2, 1/4 or 1/8 scale, the smallest that is still at least the first resize's
target, so a 4000x3000 photo for a 224 px crop is decoded at 500x375 instead of whole (docs/performance.md
has the timings and the effect on features). Other formats, and JPEGs smaller than twice the target, are
decoded exactly as ``pil`` does.
"""

from __future__ import annotations

import collections
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image

from vggft.config.schema import DataConfig
from vggft.data.images import DECODE_BUDGET, DECODE_ERRORS, MAX_DECODE_BYTES, ImageRefused, open_regular, to_rgb
from vggft.data.images import _bounded as bounded_decode
from vggft.data.images import _open as open_image
from vggft.data.loaders import ImageList, image_loader, make_loader
from vggft.data.transforms import eval_transform, normalization
from vggft.utils.errors import ConfigError, DataError
from vggft.utils.logs import log

PLAIN_SOF = (0xC0, 0xC1)  # baseline and extended sequential, Huffman-coded: what nvJPEG's batch decoder takes
NOT_SOF = (0xC4, 0xC8, 0xCC)  # DHT, JPG extension, DAC share the 0xC_ range


def resolve_decode(choice: str, device: torch.device) -> str:
    """The decode path ``data.decode`` means on ``device``: 'pil', 'draft', 'gpu:cuda' or 'gpu:cpu' (a cache key).

    auto is the tensor path on CUDA and Pillow with draft JPEG decoding elsewhere; gpu without CUDA runs the
    same tensor path on the CPU (torchvision decodes JPEGs there too), which is how it is tested on machines
    without a GPU.
    """
    if choice in ("pil", "draft"):
        return choice
    if choice == "auto" and (device.type != "cuda" or not _has_decode_jpeg()):
        return "draft"
    if not _has_decode_jpeg():
        raise ConfigError(
            "data.decode: gpu needs torchvision.io.decode_jpeg, which this torchvision lacks; "
            "set data.decode: pil (or auto)"
        )
    return "gpu:cuda" if device.type == "cuda" else "gpu:cpu"


def _has_decode_jpeg() -> bool:
    try:
        from torchvision.io import decode_jpeg  # noqa: F401  (deprecated since torchvision 0.29)
    except ImportError:
        return False
    return True


def _decode_jpeg(content, device: torch.device):
    """torchvision.io.decode_jpeg to RGB, without its deprecation warning (TorchCodec supersedes it; the
    README says so), which a user of vggft cannot act on."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(content, mode=ImageReadMode.RGB, device=device)


def jpeg_fallback_reason(content: bytes) -> str:
    """'' when the batched JPEG decoder can take ``content`` as it is; else why it goes through Pillow.

    Reads the markers up to the first scan only (the header), so it costs microseconds per file.
    """
    if content[:2] != b"\xff\xd8":
        return "not a JPEG"
    pos, size = 2, len(content)
    components, adobe_transform = None, None
    while pos + 4 <= size:
        marker = content[pos + 1]
        if content[pos] != 0xFF:
            return "damaged header"
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(content[pos + 2 : pos + 4], "big")
        body = content[pos + 4 : pos + 2 + length]
        if length < 2 or len(body) != length - 2:
            return "damaged header"
        if marker == 0xDA:  # start of scan: the header is over
            break
        reason = _segment_reason(marker, body)
        if reason:
            return reason
        if 0xC0 <= marker <= 0xCF and marker not in NOT_SOF:
            components = body[5]
        if marker == 0xEE and body.startswith(b"Adobe") and len(body) >= 12:
            adobe_transform = body[11]
        pos += 2 + length
    if components is None:
        return "damaged header"
    if components == 3 and adobe_transform == 0:
        return "RGB-coded (Adobe)"
    return ""


def _segment_reason(marker: int, body: bytes) -> str:
    if 0xC0 <= marker <= 0xCF and marker not in NOT_SOF:
        if marker == 0xC2:
            return "progressive"
        if marker not in PLAIN_SOF:
            return "lossless, hierarchical or arithmetic-coded"
        if len(body) < 6:
            return "damaged header"
        if body[0] != 8:
            return f"{body[0]}-bit"
        if body[5] == 4:
            return "CMYK"
        if body[5] not in (1, 3):
            return f"{body[5]} channels"
        if _too_large(int.from_bytes(body[3:5], "big"), int.from_bytes(body[1:3], "big")):
            return "too large to decode whole"
    if marker == 0xE1 and body.startswith(b"Exif\0\0"):
        orientation = _exif_orientation(body[6:])
        if orientation is None:
            return "unreadable EXIF"
        if 2 <= orientation <= 8:  # what Pillow's exif_transpose turns upright
            return "EXIF-rotated"
    if marker == 0xE1 and b"tiff:Orientation" in body:  # Pillow reads an XMP orientation too
        return "EXIF-rotated"
    return ""


def _too_large(width: int, height: int) -> bool:
    """Whether Pillow might read this JPEG reduced (draft) rather than whole: past PIL's pixel limit, or past the
    decode budget at the 8 bytes a pixel Pillow counts for RGB. decode_jpeg would decode it whole (3 bytes a pixel,
    a batch at once): a 30000x30000 JPEG is 2.7 GB."""
    limit = Image.MAX_IMAGE_PIXELS
    return bool(limit and width * height > limit) or 8 * width * height > MAX_DECODE_BYTES


def _exif_orientation(tiff: bytes) -> int | None:
    """The orientation tag of IFD0 (1 when absent); None when the TIFF structure does not add up."""
    orders: dict[bytes, Literal["little", "big"]] = {b"II*\0": "little", b"MM\0*": "big"}
    order = orders.get(tiff[:4])
    if order is None:
        return None
    ifd = int.from_bytes(tiff[4:8], order)
    count = int.from_bytes(tiff[ifd : ifd + 2], order)
    if ifd + 2 + 12 * count > len(tiff):
        return None
    for index in range(count):
        entry = tiff[ifd + 2 + 12 * index : ifd + 14 + 12 * index]
        if int.from_bytes(entry[:2], order) == 0x0112:
            return int.from_bytes(entry[8:10], order)
    return 1


class FileBytes(ImageList):
    """(uint8 tensor of a JPEG's bytes, '') for the device decoder, or (Pillow-decoded normalised image, why).

    Files are read as check-data and Pillow's path read them (``open_regular``): a file swapped for a FIFO
    or grown past the size cap since it was checked is refused, never waited on or read whole.
    """

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        path = self.samples[index][0]
        try:
            with open_regular(path) as handle:
                content = handle.read()
        except (OSError, ImageRefused) as err:
            detail = getattr(err, "strerror", None) or err
            raise DataError(f"{path}: cannot be read any more ({detail}); run vggft check-data") from None
        reason = jpeg_fallback_reason(content)
        if reason:
            return pil_image(path, self.transform), reason
        return torch.frombuffer(bytearray(content), dtype=torch.uint8), ""


def draft_target(data: DataConfig) -> int:
    """The side both of a JPEG's dimensions are read at least at by ``data.decode: draft``: what the first
    resize makes of the shorter side (``data.resize``), or of both (a square resize to ``image_size``)."""
    return data.image_size if data.resize is None else data.resize


def open_rgb_draft(path: str, target: int) -> Image.Image:
    """``images.open_rgb``, but a JPEG is decoded at the smallest DCT scale (1, 1/2, 1/4, 1/8) that keeps both
    sides at least ``target`` (Image.draft, before any pixel is decoded); the same limits and budget apply."""
    with open_regular(path) as handle, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked instead
        with open_image(handle) as image:
            if image.format == "JPEG":
                image.draft(image.mode, (target, target))
            with DECODE_BUDGET.hold(bounded_decode(image)):
                image.load()
                return to_rgb(image)


class DraftImageList(ImageList):
    """``ImageList`` decoding JPEGs with ``open_rgb_draft``: (image tensor, label) for each (path, label)."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform, target: int):
        super().__init__(samples, transform)
        self.target = target

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            image = open_rgb_draft(path, self.target)
        except DECODE_ERRORS as err:  # changed on disk since it was checked
            raise DataError(f"{path}: cannot be read any more ({err}); run vggft check-data") from None
        return self.transform(image), label


def pil_image(path: str, transform) -> torch.Tensor:
    """``path`` decoded by Pillow and transformed, exactly as ``data.decode: pil`` does it."""
    return ImageList([(path, 0)], transform)[0][0]


@dataclass
class Packed:
    """One batch from the workers: the JPEGs' bytes end to end, the Pillow-decoded images stacked, and the
    reason of each file ('' for a JPEG). A few shared-memory handles per batch instead of one per file:
    hundreds of small tensors in flight exhaust the file descriptors torch shares them through."""

    content: torch.Tensor
    lengths: list[int]
    images: torch.Tensor | None
    reasons: list[str]

    @classmethod
    def collate(cls, batch: list[tuple[torch.Tensor, str]]) -> Packed:
        jpegs = [item for item, reason in batch if not reason]
        pils = [item for item, reason in batch if reason]
        content = torch.cat(jpegs) if jpegs else torch.empty(0, dtype=torch.uint8)
        return cls(content, [len(j) for j in jpegs], torch.stack(pils) if pils else None, [r for _, r in batch])

    def pin_memory(self) -> Packed:
        """The batch in page-locked memory (the loader's pin_memory thread calls this on CUDA)."""
        images = self.images.pin_memory() if self.images is not None else None
        return Packed(self.content.pin_memory(), self.lengths, images, self.reasons)

    def files(self) -> list[torch.Tensor]:
        return list(torch.split(self.content, self.lengths)) if self.lengths else []


class TensorDecoder:
    """Batches of normalised images made on the device from JPEG bytes; Pillow for the files it cannot take.

    ``fallbacks`` counts the files that went through Pillow, by reason, over every pass.
    """

    def __init__(self, data: DataConfig):
        self.data = data
        self.transform = eval_transform(data)  # for the fallbacks: the same result as data.decode: pil
        self.fallbacks: collections.Counter[str] = collections.Counter()

    def batches(
        self, samples: Sequence[tuple[str, int]], *, batch_size: int, device: torch.device, num_workers: int
    ) -> Iterator[torch.Tensor]:
        """Each batch of ``samples`` in order, as a channels-last float tensor on ``device``."""
        decode_on = device if device.type == "cuda" else torch.device("cpu")
        loader = make_loader(
            FileBytes(samples, self.transform),
            batch_size,
            device=device,
            num_workers=num_workers,
            collate_fn=Packed.collate,
        )
        paths = [path for path, _ in samples]
        before, done = self.fallbacks.copy(), 0
        for packed in loader:
            images = self.decode(packed, paths[done : done + len(packed.reasons)], decode_on)
            done += len(packed.reasons)
            yield images.to(device, non_blocking=True, memory_format=torch.channels_last)
        counts = self.fallbacks - before
        if counts:
            reasons = ", ".join(f"{reason} {n}" for reason, n in counts.most_common())
            log.info(
                f"Decoding: {counts.total()} of {len(samples)} file(s) went through Pillow instead of "
                f"decode_jpeg ({reasons})"
            )

    def decode(self, packed: Packed, paths: list[str], device: torch.device) -> torch.Tensor:
        """One packed batch as normalised float images on ``device``, in the order of ``packed.reasons``."""
        files = packed.files()
        try:
            decoded = _decode_jpeg(files, device) if files else []
        except torch.OutOfMemoryError:
            raise  # not the files' fault: the caller turns it into one line naming the batch size
        except RuntimeError:  # one file the decoder rejects fails the batch: find it, file by file
            jpeg_paths = [path for path, reason in zip(paths, packed.reasons, strict=True) if not reason]
            decoded = [self._decode_one(content, path, device) for content, path in zip(files, jpeg_paths, strict=True)]
        decoded = iter(decoded)
        pils: Iterator[torch.Tensor] = iter(packed.images.to(device) if packed.images is not None else [])
        out = []
        for reason in packed.reasons:
            if reason:
                self.fallbacks[reason] += 1
                out.append(next(pils))
            else:
                image = next(decoded)
                out.append(image if image.is_floating_point() else self._geometry(image))
        return torch.stack(out)

    def _decode_one(self, content: torch.Tensor, path: str, device: torch.device) -> torch.Tensor:
        try:
            return _decode_jpeg(content, device)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:
            self.fallbacks["rejected by decode_jpeg"] += 1
            return pil_image(path, self.transform).to(device)

    def _geometry(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 (C, H, W) -> normalised float (3, S, S): Resize, CenterCrop, ToTensor, Normalize as tensors."""
        from torchvision.transforms.v2 import functional as F

        data, size = self.data, self.data.image_size
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        if data.resize is None:
            image = F.resize(image, [size, size], antialias=True)
        else:
            image = F.center_crop(F.resize(image, [data.resize], antialias=True), [size, size])
        mean, std = normalization(data)
        return F.normalize(F.to_dtype(image, torch.float32, scale=True), list(mean), list(std))


def device_batches(
    samples: Sequence[tuple[str, int]],
    transform,
    decoder: TensorDecoder | None,
    *,
    batch_size: int,
    device: torch.device,
    num_workers: int,
    draft: int | None = None,
    memory_format: torch.memory_format = torch.channels_last,
) -> Iterator[torch.Tensor]:
    """Batches of normalised images on ``device`` for extraction: Pillow and ``transform`` in the workers
    (JPEGs read at ``draft`` px or more, when given), or ``decoder`` (the tensor path) when given."""
    if decoder is not None:
        for images in decoder.batches(samples, batch_size=batch_size, device=device, num_workers=num_workers):
            yield images.contiguous(memory_format=memory_format)
        return
    if draft is None:
        loader = image_loader(samples, transform, batch_size, device=device, num_workers=num_workers)
    else:
        loader = make_loader(
            DraftImageList(samples, transform, draft), batch_size, device=device, num_workers=num_workers
        )
    for images, _ in loader:
        yield images.to(device, non_blocking=True, memory_format=memory_format)
