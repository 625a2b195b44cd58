"""Fixtures: tiny generated image folders, the tiny stand-in VGG, a seeded fake IMAGENET1K_V1 file,
isolated caches, models trained once per module (train_once, trained); and the suite's shared checks: a
refusal's one line (assert_one_line_error) and a deadline against hangs."""

from __future__ import annotations

import logging
import os
import random
import signal
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
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


PET = {"train": {"cat": 6, "dog": 6}, "test": {"cat": 3, "dog": 4}}  # what the ``pet`` fixture holds

REPO = Path(__file__).resolve().parent.parent
HUB_FILE = "vgg16-397923af.pth"  # torchvision's file name of vgg16 IMAGENET1K_V1


def pytest_configure(config):
    config.addinivalue_line("markers", "real_vgg: uses torchvision's full VGG-16 (537 MB of weights)")
    # train.amp: auto is bf16 on a CPU with native bf16: the suite's numbers are fp32 on every CPU (subprocesses
    # inherit it); tests/test_bf16.py forces the bf16 path. VGGFT_CPU_BF16=1 pytest runs everything in bf16.
    os.environ.setdefault("VGGFT_CPU_BF16", "0")


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
    return make_folder(tmp_path / "pet", PET)


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
    return {
        **os.environ,
        "VGGFT_TEST_TINY": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([stand_in, *source_path()]),
    }


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


def assert_one_line_error(
    result,
    *,
    code: int,
    names: Sequence[str] = (),
    fix: str = "",
    after_notes: bool = False,
    allow_stdout: bool = False,
) -> str:
    """A refusal as vggft promises one: exit status ``code``, no traceback, nothing on stdout, and on stderr
    one line that starts with 'error: ', names each of ``names`` (the config key, option or file at fault, the
    value given) and says ``fix`` (the actionable part). With ``after_notes`` the notes of the work done before
    the refusal may come first: the error is then the last line of stderr and the only one that starts with
    'error'. ``allow_stdout`` only where a library that vggft calls prints there (the test then says what it
    may print). It checks what the message must say, not its wording; returns the line for further checks."""
    assert result.exit_code == code, f"exit {result.exit_code}, expected {code}:\n{result.output}"
    assert "Traceback" not in result.output, result.output
    assert allow_stdout or not result.stdout, f"stdout of a refusal: {result.stdout!r}"
    lines = result.stderr.strip().splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("error")]
    assert errors == [len(lines) - 1] and (after_notes or len(lines) == 1), f"not one error line:\n{result.stderr}"
    return assert_error_says(lines[-1], names=names, fix=fix)


def assert_error_says(line: str, *, names: Sequence[str] = (), fix: str = "") -> str:
    """``line`` is an error line ('error: ...') naming each of ``names`` and saying ``fix``."""
    assert names or fix, "a check of an error line needs what it must name or advise"
    assert isinstance(names, (list, tuple)), "names: a list of strings (a lone string would be checked per letter)"
    assert line.startswith("error: "), line
    missing = [name for name in names if name not in line]
    assert not missing, f"{line!r} does not name {missing}"
    assert fix in line, f"{line!r} does not say the fix {fix!r}"
    return line


class Overdue(Exception):
    """Not an OSError (os.walk swallows those), so that nothing on the way out can hide it."""


@contextmanager
def deadline(seconds: int):
    """Fail, instead of hanging the suite, when the block takes longer than ``seconds`` (a blocked open() of a
    FIFO is interrupted too). A guard against hangs, not a measure of speed: give it room to spare."""

    def expired(*_):
        raise Overdue(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


class ModuleFolder:
    """A folder of a test module's own, ``root``, holding the image folder ``root/pet``, and training in it
    through the real CLI with the module's own cache and the fake hub, ``root`` the working folder."""

    def __init__(self, root: Path, hub: Path):
        self.root, self.hub, self.pet = root, hub, root / "pet"

    def train(self, *args: str, weights: str = "models/VGG16.pt") -> Path:
        """``vggft train --set data.root=<pet> --set output.weights=<root/weights> *args``, which must succeed;
        returns the weights."""
        path = self.root / weights
        self.run("train", "--set", f"data.root={self.pet}", "--set", f"output.weights={path}", *args)
        return path

    def run(self, *args: str):
        """``vggft *args`` in ``root`` with the module's cache and the fake hub, which must succeed; returns the
        result."""
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("VGGFT_CACHE", str(self.root / "cache"))
            patch.setenv("TORCH_HOME", str(self.hub))
            patch.chdir(self.root)
            result = invoke(CliRunner(), *args)
        assert result.exit_code == 0, result.output
        return result


@pytest.fixture(scope="module")
def train_once(tmp_path_factory, fake_hub):
    """For a module-scoped fixture that trains once for the whole module: ``train_once(name, folders=PET)``
    makes ``<tmp>/<name>/pet`` from ``folders`` (as make_folder) and returns its ModuleFolder, whose
    ``train(*args)`` runs the real CLI there. A module's tests share what it trained: they read it."""

    def make(name: str, folders: dict[str, dict[str, int]] = PET) -> ModuleFolder:
        root = tmp_path_factory.mktemp(name)
        make_folder(root / "pet", folders)
        return ModuleFolder(root, fake_hub)

    return make


@pytest.fixture(scope="module")
def trained(train_once) -> Path:
    """models/VGG16.pt (+ sidecar) trained once for the module at 32 px (FAST) on a pet folder of its own
    (``trained.parent.parent / 'pet'``); returns the weights."""
    return train_once("trained").train(*FAST)


# Small and fast, with the tutorial's model and head: vgg16 at 32 px (its adaptive pool accepts it).
FAST = ["--set", "data.image_size=32", "--set", "data.resize=36", "--set", "train.epochs=2", "--quiet"]
