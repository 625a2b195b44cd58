"""Fixtures: tiny generated image folders, a seeded fake IMAGENET1K_V1 file, isolated caches."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.models import vgg16
from typer.testing import CliRunner

from vggft.cli import app

# Colours a frozen random network can tell apart: each class a hue, with per-image jitter.
CLASS_COLOURS = {"cat": (200, 60, 40), "dog": (40, 80, 200), "owl": (60, 180, 60)}


def make_image(path: Path, colour, size=(40, 32), seed=0, fmt=None, mode="RGB") -> Path:
    rng = random.Random(seed)
    jitter = tuple(max(0, min(255, c + rng.randint(-30, 30))) for c in colour)
    image = Image.new("RGB", size, jitter)
    for _ in range(20):
        x, y = rng.randrange(size[0]), rng.randrange(size[1])
        image.putpixel((x, y), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.convert(mode).save(path, format=fmt)
    return path


def make_folder(root: Path, counts: dict[str, dict[str, int]], seed: int = 0) -> Path:
    """root/<split>/<class>/<class>.<i>.jpg, e.g. counts={'train': {'cat': 4, 'dog': 4}}."""
    n = 0
    for split, classes in counts.items():
        for name, count in classes.items():
            for i in range(count):
                n += 1
                folder = root / split if split else root
                make_image(folder / name / f"{name}.{i}.jpg", CLASS_COLOURS[name], seed=seed * 1000 + n)
    return root


@pytest.fixture(scope="session")
def fake_hub(tmp_path_factory) -> Path:
    """$TORCH_HOME holding a seeded random vgg16 state_dict under torchvision's IMAGENET1K_V1 file name."""
    home = tmp_path_factory.mktemp("torch_home")
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(1234)
    torch.save(vgg16().state_dict(), checkpoints / "vgg16-397923af.pth")
    return home


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path, fake_hub):
    """Every test: its own cache folder, the fake hub, and a working directory of its own."""
    monkeypatch.setenv("VGGFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(fake_hub))
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def pet(tmp_path) -> Path:
    return make_folder(tmp_path / "pet", {"train": {"cat": 6, "dog": 6}, "test": {"cat": 3, "dog": 4}})


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, *args: str):
    """Run the real CLI in-process; return the result (stdout and stderr kept apart)."""
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


# Small and fast, with the tutorial's model and head: vgg16 at 32 px (its adaptive pool accepts it).
FAST = ["--set", "data.image_size=32", "--set", "data.resize=36", "--set", "train.epochs=2", "--quiet"]
