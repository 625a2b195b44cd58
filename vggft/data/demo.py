"""A small, learnable image folder made on the spot, so the tool runs offline on a fresh machine.

Two classes a frozen network can tell apart even from random weights: warm, round
"sun" pictures and cool, square "sea" pictures, with noise, random sizes and placement.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from vggft.config.options import check_demo
from vggft.utils.errors import OutputError
from vggft.utils.files import atomic_path

CLASSES = ("sea", "sun")


def _picture(kind: str, rng: random.Random, size: int) -> Image.Image:
    if kind == "sun":
        background = (rng.randint(150, 255), rng.randint(80, 170), rng.randint(0, 80))
        ink = (255, rng.randint(200, 255), rng.randint(0, 120))
    else:
        background = (rng.randint(0, 80), rng.randint(60, 150), rng.randint(150, 255))
        ink = (rng.randint(200, 255), rng.randint(200, 255), 255)
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 3)):
        r = rng.randint(size // 8, size // 3)
        x, y = rng.randint(0, size - 1), rng.randint(0, size - 1)
        box = (x - r, y - r, x + r, y + r)
        (draw.ellipse if kind == "sun" else draw.rectangle)(box, fill=ink)
    noise = Image.effect_noise((size, size), rng.randint(20, 50)).convert("RGB")
    return Image.blend(image, noise, 0.15).filter(ImageFilter.GaussianBlur(rng.random()))


def make_demo_data(
    root: str | Path, train_per_class: int = 24, test_per_class: int = 10, size: int = 64, seed: int = 0
) -> Path:
    """Write root/{train,test}/{sea,sun}/*.jpg; existing files are left as they are.

    A root that is a file, lies under a file, or cannot be written is an OutputError naming it.
    """
    check_demo(train_per_class, test_per_class)
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise OutputError(f"make-demo: '{root}' is a file, not a folder; give a folder path such as data/demo")
    rng = random.Random(seed)
    try:
        for split, count in (("train", train_per_class), ("test", test_per_class)):
            for kind in CLASSES:
                folder = root / split / kind
                folder.mkdir(parents=True, exist_ok=True)
                for index in range(count):
                    path = folder / f"{kind}.{index:04d}.jpg"
                    picture = _picture(kind, rng, size)
                    if not path.exists():
                        with atomic_path(path) as tmp:  # a full disk leaves no half-written JPEG behind
                            picture.save(tmp, format="JPEG", quality=90)
    except OSError as err:
        where = f"'{err.filename}'" if err.filename else f"'{root}'"
        raise OutputError(
            f"make-demo: cannot write {where} ({err.strerror or err}); choose a writable folder for PATH"
        ) from None
    return root
