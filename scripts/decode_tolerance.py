#!/usr/bin/env python
"""Measure how far data.decode: gpu (decode_jpeg + tensor resize) is from data.decode: pil, in features.

Generates JPEGs of assorted sizes and aspect ratios (one grayscale), runs both extraction paths of vggft
on them and the frozen prefix of a seeded, randomly initialised VGG (classifier6 head: the prefix ends
at classifier.1, 4096 values per image) in fp32, and prints the largest pixel difference (8-bit levels,
after undoing the normalisation) and the largest |difference| of the prefix outputs, absolute and
relative to their largest magnitude. Nothing is downloaded.

    python scripts/decode_tolerance.py                    # 16 JPEGs at 224 px on the CPU (libjpeg-turbo both ways)
    python scripts/decode_tolerance.py --device cuda      # nvJPEG on the GPU against Pillow
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

SIZES = [(500, 375), (375, 500), (640, 480), (333, 500), (256, 256), (800, 533), (300, 225), (480, 640)]


def make_jpegs(folder: Path, count: int, seed: int = 0) -> list[tuple[str, int]]:
    """``count`` JPEGs (quality 90) of the sizes above in turn; the fourth is grayscale."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for index in range(count):
        w, h = SIZES[index % len(SIZES)]
        colour = tuple(rng.randint(30, 220) for _ in range(3))
        image = Image.blend(Image.effect_noise((w, h), 50).convert("RGB"), Image.new("RGB", (w, h), colour), 0.7)
        draw = ImageDraw.Draw(image)
        for _ in range(5):
            x, y, r = rng.randrange(w), rng.randrange(h), rng.randint(10, w // 4)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(255 - c for c in colour))
        path = folder / f"img{index:04d}.jpg"
        (image.convert("L") if index % 8 == 3 else image).save(path, quality=90)
        samples.append((str(path), index % 2))
    return samples


def compare(samples, data, prefix, device) -> dict:
    """Both decode paths of vggft on ``samples`` at ``data``'s geometry, then ``prefix`` (fp32) on each."""
    import torch

    from vggft.data.decode import TensorDecoder, device_batches
    from vggft.data.transforms import eval_transform, normalization

    batch = dict(batch_size=8, device=device, num_workers=0)
    pil = torch.cat(list(device_batches(samples, eval_transform(data), None, **batch)))
    decoder = TensorDecoder(data)
    tensor = torch.cat(list(device_batches(samples, None, decoder, **batch)))
    _, std = normalization(data)
    levels = float(((pil - tensor).abs() * torch.tensor(std, device=device).view(1, 3, 1, 1) * 255).max())
    prefix = prefix.to(device).eval()
    with torch.inference_mode():
        a, b = prefix(pil).float(), prefix(tensor).float()
    diff, top = float((a - b).abs().max()), float(a.abs().max())
    return {
        "images": len(samples),
        "image_size": data.image_size,
        "resize": data.resize,
        "device": str(device),
        "pixel_levels": levels,
        "feature_max_abs_diff": diff,
        "feature_max_abs": top,
        "feature_relative": diff / top if top else 0.0,
        "fallbacks": dict(decoder.fallbacks),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (decode and forward there)")
    parser.add_argument("--arch", default="vgg16")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--json", action="store_true", help="print one line of JSON instead of text")
    args = parser.parse_args(argv)

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's vggft
    from vggft.config.schema import DataConfig, ModelConfig
    from vggft.model.build import build_model, split_frozen_prefix

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=args.arch, weights=None), 2, None)
    prefix, _, cut = split_frozen_prefix(model)
    data = DataConfig(image_size=args.image_size, resize=args.resize)
    with tempfile.TemporaryDirectory(prefix="vggft-decode-") as folder:
        result = compare(make_jpegs(Path(folder), args.images), data, prefix, torch.device(args.device))
    result.update(arch=args.arch, cut=cut, weights="seeded random init")
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"{args.arch} (random init), prefix up to {cut}, {result['images']} JPEGs at {args.image_size} px "
        f"(resize {args.resize}) on {args.device}, decode gpu vs pil:"
    )
    print(f"  pixels: max |diff| {result['pixel_levels']:.2f} levels of 255")
    print(
        f"  prefix outputs: max |diff| {result['feature_max_abs_diff']:.3g} of max |value| "
        f"{result['feature_max_abs']:.3g} (relative {result['feature_relative']:.2e})"
    )
    print(f"  fallbacks to Pillow: {result['fallbacks'] or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
