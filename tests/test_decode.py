"""data.decode: the tensor path (decode_jpeg, tensor resize) against Pillow, per-file fallback, the cache key.

Without CUDA ``data.decode: gpu`` runs the same tensor path on the CPU, which is what these tests run.
Tolerance, measured here: pixels differ by at most one 8-bit level after de-normalising (tensor
antialiased resize vs Pillow's, both from libjpeg-turbo's decode), and the frozen prefix's outputs by at
most 1e-3 of their largest magnitude (the tiny stand-in at 64 px: about 2e-7 measured).
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

import vggft.data.decode
from conftest import FAST, invoke, make_folder, make_image
from vggft.config.loading import load_config
from vggft.config.schema import DataConfig, ModelConfig
from vggft.data.decode import FileBytes, Packed, TensorDecoder, device_batches, jpeg_fallback_reason, resolve_decode
from vggft.data.transforms import eval_transform
from vggft.features.cache import FeatureSource
from vggft.model.build import build_model, split_frozen_prefix
from vggft.utils.errors import DataError

CPU = torch.device("cpu")
DATA = DataConfig(image_size=64, resize=72)
PIXEL_LEVELS = 1.0 + 1e-3  # max |difference| in 8-bit levels, after undoing the normalisation
FEATURE_TOLERANCE = 1e-3  # max |difference| of prefix outputs, relative to their largest magnitude


def _picture(rng: random.Random, width: int, height: int) -> Image.Image:
    """Discs on a background with noise and a blur, every pixel from ``rng`` (Pillow's effect_noise draws
    from the C library's rand(), which earlier tests in this process have moved on)."""
    image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y, r = rng.randrange(width), rng.randrange(height), rng.randrange(4, max(width, height) // 3)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
    noise = Image.frombytes("RGB", (width, height), rng.randbytes(3 * width * height))
    return Image.blend(image, noise, 0.15).filter(ImageFilter.GaussianBlur(rng.random()))


def _jpegs(folder: Path) -> list[tuple[str, int]]:
    """Plain JPEGs of assorted sizes and aspect ratios (one grayscale): all for the tensor path."""
    rng = random.Random(0)
    samples = []
    for i, (w, h) in enumerate([(120, 90), (90, 120), (200, 150), (64, 64), (77, 131), (300, 220)]):
        picture = _picture(rng, w, h)
        path = folder / f"plain{i}.jpg"
        (picture.convert("L") if i == 3 else picture).save(path, quality=90)
        samples.append((str(path), 0))
    return samples


def _both(samples, data=DATA, workers=0):
    pil = torch.cat(
        list(device_batches(samples, eval_transform(data), None, batch_size=4, device=CPU, num_workers=workers))
    )
    decoder = TensorDecoder(data)
    tensor = torch.cat(list(device_batches(samples, None, decoder, batch_size=4, device=CPU, num_workers=workers)))
    return pil, tensor, decoder


def _levels(a: torch.Tensor, b: torch.Tensor) -> float:
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return float(((a - b).abs() * std * 255).max())


@pytest.mark.parametrize("resize", [72, None])
def test_tensor_path_matches_pillow_within_tolerance(tmp_path, resize):
    data = DataConfig(image_size=64, resize=resize)
    samples = _jpegs(tmp_path)
    pil, tensor, decoder = _both(samples, data)
    assert not decoder.fallbacks  # grayscale too: expanded to three channels on the tensor path
    assert pil.shape == tensor.shape == (6, 3, 64, 64) and tensor.is_contiguous(memory_format=torch.channels_last)
    assert _levels(pil, tensor) <= PIXEL_LEVELS
    torch.manual_seed(0)
    prefix, _, _ = split_frozen_prefix(build_model(ModelConfig(weights=None), 2, None))
    with torch.inference_mode():
        a, b = prefix(pil), prefix(tensor)
    assert float((a - b).abs().max()) <= FEATURE_TOLERANCE * float(a.abs().max())


def _dirty(folder: Path) -> dict[str, str]:
    """Files the batched decoder must not take: {name: the reason counted}."""
    make_image(folder / "png_named.jpg", (30, 30, 200), fmt="PNG")
    make_image(folder / "cmyk.jpg", (200, 30, 30), mode="CMYK")
    Image.new("RGB", (50, 40), (90, 160, 20)).save(folder / "progressive.jpg", progressive=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    Image.new("RGB", (60, 30), (1, 2, 3)).save(folder / "rotated.jpg", exif=exif)
    return {
        "png_named.jpg": "not a JPEG",
        "cmyk.jpg": "CMYK",
        "progressive.jpg": "progressive",
        "rotated.jpg": "EXIF-rotated",
    }


def test_dirty_files_go_through_pillow_one_by_one_and_are_counted_once(tmp_path, notes):
    samples = _jpegs(tmp_path)
    expected = _dirty(tmp_path)
    for name, reason in expected.items():
        assert jpeg_fallback_reason((tmp_path / name).read_bytes()) == reason
    samples += [(str(tmp_path / name), 0) for name in expected]
    notes()
    pil, tensor, decoder = _both(samples, workers=2)  # the byte reader runs in real worker processes
    assert dict(decoder.fallbacks) == {reason: 1 for reason in expected.values()}
    assert torch.equal(pil[6:], tensor[6:])  # a fallback is exactly what data.decode: pil gives
    assert _levels(pil[:6], tensor[:6]) <= PIXEL_LEVELS
    lines = [line for line in notes() if "went through Pillow" in line]
    assert lines == [
        "Decoding: 4 of 10 file(s) went through Pillow instead of decode_jpeg "
        "(not a JPEG 1, CMYK 1, progressive 1, EXIF-rotated 1)"
    ]


def test_a_jpeg_the_decoder_rejects_is_retried_alone_then_one_dataerror(tmp_path):
    samples = _jpegs(tmp_path)
    good = io.BytesIO()
    Image.effect_noise((128, 128), 60).convert("RGB").save(good, format="JPEG")  # mostly scan data
    broken = tmp_path / "truncated.jpg"
    broken.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    assert jpeg_fallback_reason(broken.read_bytes()) == ""  # its header is whole: only decoding finds out
    decoder = TensorDecoder(DATA)
    with pytest.raises(DataError, match=r"truncated\.jpg: cannot be read any more"):
        list(decoder.batches(samples[:2] + [(str(broken), 0)] + samples[2:], batch_size=8, device=CPU, num_workers=0))
    assert decoder.fallbacks == {"rejected by decode_jpeg": 1}  # the batch failed; the good files were retried


def test_the_tensor_path_loads_through_make_loader(tmp_path, monkeypatch):
    """Its loader is capped at the work there is, like every other (one batch: no worker processes)."""
    made = []
    make_loader = vggft.data.decode.make_loader
    monkeypatch.setattr(
        vggft.data.decode, "make_loader", lambda *args, **kwargs: made.append(make_loader(*args, **kwargs)) or made[-1]
    )
    images = list(TensorDecoder(DATA).batches(_jpegs(tmp_path), batch_size=8, device=CPU, num_workers=2))
    assert len(images) == 1 and [loader.num_workers for loader in made] == [0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs CUDA")
def test_a_packed_batch_is_pinned_for_the_copy_to_the_gpu(tmp_path):
    files = FileBytes(_jpegs(tmp_path) + [(str(make_image(tmp_path / "p.png", (9, 9, 9))), 0)], eval_transform(DATA))
    packed = Packed.collate([files[i] for i in range(len(files))])
    pinned = packed.pin_memory()
    assert pinned.content.is_pinned() and pinned.images.is_pinned()
    assert torch.equal(pinned.content, packed.content) and torch.equal(pinned.images, packed.images)
    assert (pinned.lengths, pinned.reasons) == (packed.lengths, packed.reasons)


def test_header_scan_refuses_what_it_cannot_vouch_for():
    assert jpeg_fallback_reason(b"") == "not a JPEG"
    assert jpeg_fallback_reason(b"\xff\xd8\xff\xe0\x00") == "damaged header"  # cut inside a segment
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpeg, format="JPEG")
    content = jpeg.getvalue()
    assert jpeg_fallback_reason(content) == ""
    exif = Image.Exif()
    exif[0x0112] = 1  # upright: no reason to fall back
    upright = io.BytesIO()
    Image.new("RGB", (8, 8)).save(upright, format="JPEG", exif=exif)
    assert jpeg_fallback_reason(upright.getvalue()) == ""


def test_resolved_path_is_part_of_the_cache_key(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig(weights=None), 2, None)
    folders = {}
    for choice in ("auto", "pil", "gpu"):
        cfg = load_config(None, [f"data.decode={choice}", f"cache.dir={tmp_path / 'cache'}"])
        source = FeatureSource(model, cfg, CPU, None)
        folders[choice] = (source.decode, source.cache.folder)
    # auto on a CPU: Pillow with JPEG draft (DCT) scaling, in a cache of its own
    assert folders["auto"][0] == "draft" and folders["pil"][0] == "pil" and folders["auto"][1] != folders["pil"][1]
    assert folders["gpu"][0] == "gpu:cpu" and folders["gpu"][1] != folders["pil"][1]
    assert resolve_decode("auto", torch.device("cuda")) == "gpu:cuda"
    assert resolve_decode("pil", torch.device("cuda")) == "pil"


def test_train_and_eval_with_gpu_decode_on_a_dirty_folder(runner, tmp_path):
    root = make_folder(tmp_path / "pet", {"train": {"cat": 6, "dog": 6}, "test": {"cat": 3, "dog": 4}})
    _dirty(root / "train" / "cat")
    (root / "train" / "dog" / "truncated.jpg").write_bytes((root / "train" / "dog" / "dog.0.jpg").read_bytes()[:300])
    args = ["--set", f"data.root={root}", "--set", "data.decode=gpu", *FAST]
    result = invoke(runner, "train", *args)
    assert result.exit_code == 0, result.output
    notes = result.stderr.splitlines()
    assert "Skipping 1 unreadable image(s)" in result.stderr  # the truncated file never reaches extraction
    (line,) = [n for n in notes if "went through Pillow" in n]
    assert line.startswith("Decoding: 4 of ") and "CMYK 1" in line
    result = invoke(runner, "eval", "--weights", "models/VGG16.pt", "--set", f"data.root={root}", "-q")
    assert result.exit_code == 0 and "/7)" in result.stdout
    # Another decode path is another cache folder: Pillow extracts every image again.
    result = invoke(runner, "train", "--set", f"data.root={root}", "--set", "data.decode=pil", *FAST[:-1])
    assert result.exit_code == 0 and "Extracting train features: 16 images" in result.stderr


def test_the_byte_reader_refuses_a_fifo_swapped_in_after_the_check(tmp_path):
    """The gpu path's workers read file bytes as everything else does: a FIFO is refused, never waited on."""
    import os

    import pytest

    from vggft.config.schema import Config
    from vggft.data.decode import FileBytes
    from vggft.data.transforms import eval_transform
    from vggft.utils.errors import DataError

    fifo = tmp_path / "swapped.jpg"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="swapped.jpg: cannot be read any more .*not a regular file"):
        FileBytes([(str(fifo), 0)], eval_transform(Config().data))[0]
