"""The pictures vggft writes say what they show: curves.png names its run, every eval grid tile names its file,
a Grad-CAM map without evidence tints nothing, and show-batch writes where runs go, or where it is told."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

import vggft.reporting.plots
from conftest import FAST, invoke
from vggft.model.weights import reseal_sidecar

NO_EVIDENCE = "no evidence for this class"


@pytest.fixture(scope="module")
def run(train_once) -> tuple[Path, dict]:
    """A gap-head model trained once through the CLI as run 'pics', and the figures its training drew, by file name."""
    folder = train_once("pictures")
    figures: dict = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vggft.reporting.plots, "_save", _keeper(figures))
        weights = folder.train(*FAST, "--name", "pics", "--set", "model.head=gap")
    return weights, figures


@pytest.fixture
def drawn(monkeypatch) -> dict:
    """The figures the command under test draws, by file name (not rendered: their text is what is checked)."""
    figures: dict = {}
    monkeypatch.setattr(vggft.reporting.plots, "_save", _keeper(figures))
    return figures


def _keeper(figures: dict):
    """A stand-in for plots._save that keeps each figure under its file name instead of rendering it."""

    def keep(fig, path):
        figures[Path(path).name] = fig
        return Path(path)

    return keep


def _tiles(fig) -> list:
    """The grid cells that hold a picture (a grid's spare cells are empty)."""
    return [ax for ax in fig.axes if ax.images]


def _dead(weights: Path, folder: Path) -> Path:
    """The same model with the last conv's output below zero everywhere: every Grad-CAM map is all zero."""
    state = torch.load(weights, weights_only=True)
    state["features.28.weight"].zero_()
    state["features.28.bias"].fill_(-1.0)
    dead = folder / "dead.pt"
    torch.save(state, dead)
    sidecar = json.loads(weights.with_suffix(".json").read_text())  # the class names; the new file's hash
    sidecar.update(weights_file=dead.name, weights_sha256=hashlib.sha256(dead.read_bytes()).hexdigest())
    dead.with_suffix(".json").write_text(json.dumps(sidecar))
    reseal_sidecar(dead)  # an intended edit
    return dead


def test_curves_png_is_titled_with_the_run_name_arch_and_head(run):
    _, figures = run
    assert figures["curves.png"].get_suptitle() == "pics: vgg16, gap head"


def test_top_loss_tiles_name_their_file_as_the_mistake_tiles_do(runner, run, drawn, tmp_path):
    weights, _ = run
    pet = weights.parent.parent / "pet"
    result = invoke(
        runner, "eval", "--weights", weights, "--top-losses", "4", "--misclassified", "4", "--plots", tmp_path, "-q"
    )
    assert result.exit_code == 0, result.output
    files = [os.path.relpath(r["path"], pet) for r in csv.DictReader((tmp_path / "VGG16.top_losses_test.csv").open())]
    titles = [ax.get_title() for ax in _tiles(drawn["VGG16.top_losses_test.png"])]
    assert len(files) == 4 and [t.splitlines()[-1] for t in titles] == files
    assert all(t.startswith("true ") and "\nloss " in t for t in titles)
    if "VGG16.misclassified_test.png" in drawn:  # the tiny model's mistakes, if it made any, say theirs alike
        mistakes = [ax.get_title() for ax in _tiles(drawn["VGG16.misclassified_test.png"])]
        assert {t.splitlines()[-1] for t in mistakes} <= set(files)  # two classes: every mistake is a top loss


def test_an_all_zero_heatmap_tints_nothing_and_says_no_evidence(runner, run, drawn, tmp_path):
    dead = _dead(run[0], tmp_path)
    picture = run[0].parent.parent / "pet" / "test" / "cat" / "cat.0.jpg"
    result = invoke(runner, "explain", picture, "--weights", dead, "--out", tmp_path / "cams", "--json", "-q")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert row["evidence"] is False
    left, right = _tiles(drawn["cat.0.cam.png"])
    assert len(left.images) == len(right.images) == 1  # the picture alone: no blue wash of a zero heatmap
    assert NO_EVIDENCE in right.get_title() and NO_EVIDENCE in drawn["cat.0.cam.png"].get_suptitle()
    result = invoke(runner, "eval", "--weights", dead, "--top-losses", "3", "--explain", "--plots", tmp_path, "-q")
    assert result.exit_code == 0, result.output
    tiles = _tiles(drawn["dead.top_losses_test.png"])
    assert len(tiles) == 3 and all(len(ax.images) == 1 and NO_EVIDENCE in ax.get_title() for ax in tiles)


def test_show_batch_writes_into_a_run_folder_or_the_one_given(runner, pet, tmp_path):
    for folder in ("show_batch", "show_batch2"):
        result = invoke(runner, "show-batch", "--data", pet, "--count", "2", "-q")
        assert result.exit_code == 0, result.output
        assert result.stdout == f"{Path('runs', folder, 'batch_train.png')}\n"
        assert (tmp_path / "runs" / folder / "batch_train.png").is_file()
        assert (tmp_path / "runs" / folder / "config.yaml").is_file()
    assert not (tmp_path / "models").exists()
    (tmp_path / "given.d").mkdir()
    for out in ("pictures", "given.d"):  # a new folder named without a suffix, and one that exists
        result = invoke(runner, "show-batch", "--data", pet, "--split", "test", "--count", "2", "--out", out, "-q")
        assert result.exit_code == 0, result.output
        assert result.stdout == f"{Path(out, 'batch_test.png')}\n" and (tmp_path / out / "batch_test.png").is_file()
