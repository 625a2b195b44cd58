"""Pixels with the real thing: 16-bit images scaled by their bit depth; decodes bounded in bytes before any pixel
is decoded: a 700 KB 9400x9400 16-bit RGBA PNG (2 GB to decode as it was) and its copies under eight decode
threads and an address-space limit, a 30000x30000 JPEG read at 1/4 scale, threads sharing one byte budget."""

from __future__ import annotations

import ctypes
import json
import os
import resource
import struct
import traceback
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from vggft.data import images
from vggft.data.decode import jpeg_fallback_reason
from vggft.data.images import VerdictLedger, inspect_all, open_rgb

# ---- files made without ever holding their pixels -------------------------------------------------------------


def zeros_zlib(count: int, chunk: int = 1 << 20) -> bytes:
    """A zlib stream of ``count`` zero bytes, in milliseconds: one fully flushed block of ``chunk`` zeros stands
    for every chunk (a full flush makes each block independent of what came before), and the Adler-32 of zeros
    is known (a = 1, b = count)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = comp.compress(bytes(chunk)) + comp.flush(zlib.Z_FULL_FLUSH)
    whole, rest = divmod(count, chunk)
    tail = comp.compress(bytes(rest)) + comp.flush()
    return b"\x78\xda" + block * whole + tail + (((count % 65521) << 16) | 1).to_bytes(4, "big")


def zero_png(path: Path, side: int, *, bits: int, colour: int) -> Path:
    """A side x side PNG of zeros (black; transparent black with alpha): ``colour`` 0 grey, 6 RGBA."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = 1 + side * {0: 1, 6: 4}[colour] * bits // 8  # a filter byte, then the samples
    header = struct.pack(">IIBBBBB", side, side, bits, colour, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zeros_zlib(row * side)) + chunk(b"IEND", b"")
    )
    return path


def grey_jpeg(path: Path, side: int) -> Path:
    """A baseline greyscale JPEG of mid grey (128), side a multiple of 16: Huffman tables of one 1-bit code, so
    every 8x8 block is two zero bits (DC difference 0, end of block) and the scan is zero bytes."""
    assert side % 16 == 0

    def segment(marker: int, body: bytes) -> bytes:
        return bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body

    one_code = bytes([1] + [0] * 15) + b"\x00"
    head = b"\xff\xd8" + segment(0xDB, b"\x00" + bytes([1] * 64))
    head += segment(0xC0, struct.pack(">BHHB", 8, side, side, 1) + b"\x01\x11\x00")
    head += segment(0xC4, b"\x00" + one_code) + segment(0xC4, b"\x10" + one_code)
    head += segment(0xDA, b"\x01\x01\x00\x00\x3f\x00")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(head + bytes((side // 8) ** 2 // 4) + b"\xff\xd9")
    return path


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _status(key: str) -> int:
    """A /proc/self/status figure in bytes (VmSize, VmRSS, VmHWM)."""
    with open("/proc/self/status", encoding="ascii") as status:
        line = next(line for line in status if line.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def in_child(work: Callable[[], dict], headroom: int) -> dict:
    """``work()`` in a forked child (this process's imports, none of its memory peaks) whose address space is
    capped at what it has plus ``headroom``, with decode threads as on an 8-core machine; its result, with
    ``added``: the most resident memory it added (Linux and glibc, as the memory limits of test_hostile)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            os.close(read)
            limit = _status("VmSize") + headroom
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            os.cpu_count = lambda: 8
            # Pillow's blocks mmapped and unmapped (glibc's default keeps freed blocks in per-thread arenas):
            # resident memory is then the memory in use.
            ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 1 << 20)
            start = _status("VmHWM")
            result = work()
            result["added"] = _status("VmHWM") - start
        except BaseException:
            result = {"error": traceback.format_exc()}
        with os.fdopen(write, "w") as out:
            out.write(json.dumps(result))
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as answer:
        text = answer.read()
    os.waitpid(pid, 0)
    assert text, "the child died without a word"
    result = json.loads(text)
    assert "error" not in result, result["error"]
    return result


def _verdicts(folder: Path) -> dict[str, dict]:
    paths = sorted(str(path) for path in folder.iterdir())
    verdicts = inspect_all(paths, VerdictLedger(None, folder), fresh=True)
    return {Path(path).name: verdict.to_dict() for path, verdict in verdicts.items()}


# ---- item 4: 16-bit images ------------------------------------------------------------------------------------


def test_16_bit_grey_is_scaled_by_its_bit_depth_not_by_its_brightest_pixel(tmp_path):
    """255 came out white and 256 black: the divisor was 255 or 65535 by the image's maximum."""
    values = [0, 255, 256, 40000, 65535]
    got = []
    for value in values:
        path = tmp_path / f"{value}.png"
        Image.new("I;16", (8, 8), value).save(path)
        with Image.open(path) as raw:
            assert raw.mode == "I;16"  # a real 16-bit PNG
        got.append(open_rgb(path).getpixel((3, 3)))
    assert got == [(0, 0, 0), (1, 1, 1), (1, 1, 1), (156, 156, 156), (255, 255, 255)]
    ramp = tmp_path / "ramp.png"  # one rule for every pixel of one image: 257 x i is i, monotonic
    Image.fromarray(np.tile(np.arange(256, dtype=np.uint16) * 257, (8, 1))).save(ramp)
    assert np.asarray(open_rgb(ramp))[0, :, 0].tolist() == list(range(256))
    for mode, suffix in (("I;16B", "tif"), ("I", "tif")):  # big-endian 16-bit; 32-bit integer grey
        path = tmp_path / f"{mode.replace(';', '')}.{suffix}"
        Image.new(mode, (8, 8), 255).save(path)
        with Image.open(path) as raw:
            assert raw.mode == mode
        assert open_rgb(path).getpixel((0, 0)) == (1, 1, 1), mode


# ---- item 5: bytes bounded before decoding --------------------------------------------------------------------


def test_decompression_sized_images_under_a_memory_limit_are_refused_or_read_reduced(tmp_path):
    """Sixteen copies of a 9400x9400 16-bit RGBA PNG (700 KB; it took 2 GB to decode, 4.7 GB for check-data with
    2 threads) under eight threads and 1.5 GiB of address space: each refused from its header, as the 30000² PNG
    bomb is; the 30000x30000 JPEG the docs promise to read reduced is read at 1/4 scale."""
    folder = tmp_path / "big"
    bomb = zero_png(folder / "00.png", 9400, bits=16, colour=6)
    assert bomb.stat().st_size < 1 << 20
    for index in range(1, 16):
        os.link(bomb, folder / f"{index:02}.png")
    zero_png(folder / "huge.png", 30000, bits=8, colour=0)
    jpeg = grey_jpeg(folder / "huge.jpg", 30000)

    def work() -> dict:
        verdicts = _verdicts(folder)
        try:
            open_rgb(bomb)  # as predict and the DataLoader workers read it
            refused = ""
        except images.ImageRefused as err:
            refused = str(err)
        picture = open_rgb(jpeg)
        corner = np.asarray(picture)[0, 0].tolist()
        return {"verdicts": verdicts, "refused": refused, "jpeg": [list(picture.size), corner]}

    result = in_child(work, headroom=1536 << 20)
    # data.decode: gpu would decode it whole (2.7 GB): it goes to Pillow, which reads it reduced
    assert jpeg_fallback_reason(jpeg.read_bytes()) == "too large to decode whole"
    verdicts = result["verdicts"]
    detail = "9400x9400 RGBA = 674 MiB is too much to decode (at most 512 MiB)"
    for index in range(16):
        assert (verdicts[f"{index:02}.png"]["reason"], verdicts[f"{index:02}.png"]["detail"]) == ("unsupported", detail)
    assert result["refused"] == detail
    assert verdicts["huge.png"]["reason"] == "unsupported" and "\n" not in verdicts["huge.png"]["detail"]
    jpeg_verdict = verdicts["huge.jpg"]
    assert jpeg_verdict["ok"] and (jpeg_verdict["width"], jpeg_verdict["height"]) == (7500, 7500)
    assert result["jpeg"] == [[7500, 7500], [128, 128, 128]]
    assert result["added"] < 600 << 20, result["added"]  # the JPEG at 1/4: 7500² grey and its RGB, 281 MB


def test_decode_threads_hold_at_most_the_shared_byte_budget(tmp_path):
    """Eight threads on six PNGs each under the per-image cap decode two at a time, not six: the total scaled
    down 16x to keep this quick (64 MiB; 2000x2000 16-bit RGBA PNGs, 32 MB each to decode: 192 MB unbounded)."""
    first = zero_png(tmp_path / "near" / "0.png", 2000, bits=16, colour=6)
    for index in range(1, 6):
        os.link(first, first.parent / f"{index}.png")

    def work() -> dict:
        images.DECODE_BUDGET.total = 64 << 20
        return {"ok": [verdict["ok"] for verdict in _verdicts(first.parent).values()]}

    result = in_child(work, headroom=1536 << 20)
    assert result["ok"] == [True] * 6
    assert result["added"] < 100 << 20, result["added"]
