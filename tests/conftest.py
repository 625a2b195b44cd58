"""Fixtures: tiny generated image folders, the tiny stand-in VGG, a seeded fake IMAGENET1K_V1 file,
isolated caches."""

from __future__ import annotations

import logging
import os
import random
import tempfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.models import vgg16
from typer.testing import CliRunner

import vggft.model.build
from tiny import tiny_vgg
from vggft.cli import app
from vggft.utils.logs import log

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


REPO = Path(__file__).resolve().parent.parent
HUB_FILE = "vgg16-397923af.pth"  # torchvision's file name of vgg16 IMAGENET1K_V1


def pytest_configure(config):
    config.addinivalue_line("markers", "real_vgg: uses torchvision's full VGG-16 (537 MB of weights)")


def _hub(home: Path, state_dict: dict) -> Path:
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(state_dict, checkpoints / HUB_FILE)
    return home


@pytest.fixture(scope="session")
def fake_hub(tmp_path_factory) -> Path:
    """$TORCH_HOME holding a seeded random tiny vgg16 state_dict under torchvision's IMAGENET1K_V1 file name."""
    torch.manual_seed(1234)
    return _hub(tmp_path_factory.mktemp("torch_home"), tiny_vgg("vgg16").state_dict())


@pytest.fixture(scope="session")
def real_hub():
    """$TORCH_HOME with a seeded random full-size vgg16 state_dict; removed when the session ends."""
    with tempfile.TemporaryDirectory(prefix="vggft-real-hub-") as folder:
        torch.manual_seed(1234)
        yield _hub(Path(folder), vgg16().state_dict())


REAL_VGG = vggft.model.build.vgg


@pytest.fixture(scope="session", autouse=True)
def tiny_network():
    """The whole session builds the tiny stand-in, module-scoped fixtures too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vggft.model.build, "vgg", tiny_vgg)
        yield


@pytest.fixture(autouse=True)
def isolated(request, monkeypatch, tmp_path, fake_hub):
    """Every test: its own cache folder, the fake hub, a working directory of its own, and the tiny VGG
    (torchvision's real one for tests marked real_vgg)."""
    monkeypatch.setenv("VGGFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    if request.node.get_closest_marker("real_vgg"):
        monkeypatch.setenv("TORCH_HOME", str(request.getfixturevalue("real_hub")))
        monkeypatch.setattr(vggft.model.build, "vgg", REAL_VGG)
    else:
        monkeypatch.setenv("TORCH_HOME", str(fake_hub))
    yield
    log.handlers.clear()  # the CLI's stderr handler points at a stream CliRunner has closed
    log.propagate, log.level = True, logging.NOTSET  # library defaults again (caplog sees the notes)


@pytest.fixture
def pet(tmp_path) -> Path:
    return make_folder(tmp_path / "pet", {"train": {"cat": 6, "dog": 6}, "test": {"cat": 3, "dog": 4}})


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


class _Exploit:
    """A pickled object whose unpickling runs ``touch marker``: what a malicious torch file does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil_pickle(tmp_path) -> tuple[_Exploit, Path]:
    """(payload, marker): put ``payload`` anywhere in what torch.save writes; ``marker`` exists only if
    loading the file ran its code."""
    marker = tmp_path / "pwned"
    return _Exploit(marker), marker


def tiny_subprocess_env() -> dict[str, str]:
    """The environment for a vggft subprocess that builds the tiny stand-in (see tests/stand_in/)."""
    stand_in = str(Path(__file__).resolve().parent / "stand_in")
    return {**os.environ, "VGGFT_TEST_TINY": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([stand_in, *source_path()])}


def source_path() -> list[str]:
    """sys.path for a child process, this checkout's vggft first (whatever its working folder)."""
    import sys

    return [str(REPO), *(p for p in sys.path if p)]


@pytest.fixture
def notes(caplog):
    """The lines vggft's library code logs (the notes the CLI prints on stderr), as a list."""
    caplog.set_level(logging.INFO, logger="vggft")

    class Notes:
        def __call__(self) -> list[str]:
            lines = [record.getMessage() for record in caplog.records if record.name.startswith("vggft")]
            caplog.clear()
            return lines

    return Notes()


def invoke(runner: CliRunner, *args: str):
    """Run the real CLI in-process; return the result (stdout and stderr kept apart)."""
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


# Small and fast, with the tutorial's model and head: vgg16 at 32 px (its adaptive pool accepts it).
FAST = ["--set", "data.image_size=32", "--set", "data.resize=36", "--set", "train.epochs=2", "--quiet"]
