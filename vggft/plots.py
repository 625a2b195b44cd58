"""Pictures people open: a labelled grid of images."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a screen
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .files import atomic_path  # noqa: E402
from .transforms import denormalize  # noqa: E402


def save_image_grid(images: torch.Tensor, titles: list[str], mean, std, path: Path,
                    title_colors: list[str] | None = None) -> Path:
    """Normalised image tensors back to real colours, one titled cell each, saved as PNG."""
    pixels = denormalize(images, mean, std).permute(0, 2, 3, 1).numpy()
    count = len(pixels)
    cols = min(count, 5)
    if count % cols and count % 4 == 0:
        cols = 4  # 8 or 12 images fill whole rows of four
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows), squeeze=False)
    for index, ax in enumerate(axes.flat):
        ax.axis("off")
        if index < count:
            ax.imshow(pixels[index])
            color = title_colors[index] if title_colors else "black"
            ax.set_title(titles[index], fontsize=9, color=color)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
