"""What a new user meets (issue 11): presets, help, one-line refusals of senseless values, readable
tables and pictures, and messages that say the right thing."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import vggft.diagnostics.evaluation
import vggft.features.cache
import vggft.reporting.plots
import vggft.utils.logs
from conftest import FAST, assert_one_line_error, invoke, make_folder
from tiny import tutorial_model
from vggft import __version__
from vggft.cli import app
from vggft.config import presets
from vggft.config.loading import load_config
from vggft.config.schema import Config, all_keys
from vggft.data import check
from vggft.reporting.metrics import Metrics
from vggft.reporting.plots import CELL_CHARS, fit_title, format_report


def _help(*command: str) -> str:
    """``--help`` of a command, wide, with the box drawing and line wrapping taken out."""
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "250", "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.stdout).split())


# --- what already worked: kept working -----------------------------------------------------------


def test_version_alone(runner):
    result = invoke(runner, "--version")
    assert result.exit_code == 0 and result.stdout == f"vggft {__version__}\n"


def test_yaml_off_is_accepted_where_off_is_documented(runner, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  amp: off\ndata:\n  augment: off\ncache: off\n")  # YAML reads off as False
    cfg = load_config(path)
    assert (cfg.train.amp, cfg.data.augment, cfg.cache.enabled) == ("off", "none", False)
    assert load_config(None, ["train.amp=off", "data.augment=off", "cache=off"]).train.amp == "off"


def test_a_set_mistake_names_set_and_epochs_zero_is_refused(runner):
    assert_one_line_error(
        invoke(runner, "summary", "--config", "demo", "--set", "train.lr=fast"),
        code=2,
        names=["--set", "train.lr", "'fast'"],
        fix="expected a number",
    )
    assert_one_line_error(
        invoke(runner, "train", "--set", "train.epochs=0"),
        code=2,
        names=["--set", "train.epochs", "got 0"],
        fix="greater than 0",
    )


def test_a_whole_pickled_model_is_named_and_explained(runner, pet, tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(tutorial_model(2), path)  # the other tutorial habit: the module, not its state_dict
    line = assert_one_line_error(
        invoke(runner, "eval", "--weights", path, "--set", f"data.root={pet}", "-q"),
        code=4,
        names=[f"'{path}'", "whole pickled model", "torchvision.models.vgg.VGG"],
        fix="torch.save(m.state_dict(), ",
    )
    assert "Weights only load failed" not in line


def test_sidecar_root_is_absolute_and_a_replaced_model_is_said(runner, tmp_path):
    make_folder(tmp_path / "pet", {"train": {"cat": 4, "dog": 4}, "test": {"cat": 2, "dog": 2}})
    args = ["train", "--set", "data.root=pet", *FAST, "--set", "train.epochs=1"]
    first = invoke(runner, *args)
    assert first.exit_code == 0 and "Replaced" not in first.stderr
    second = invoke(runner, *args)
    assert second.exit_code == 0
    assert (
        "Replaced the earlier models/VGG16.pt; the run that made it, runs/train, still holds it: "
        "vggft eval/predict/export --weights runs/train/best.pt"
    ) in second.stderr
    sidecar = json.loads(Path("models/VGG16.json").read_text())
    assert sidecar["config"]["data"]["root"] == str(tmp_path / "pet")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.chdir(elsewhere)  # the isolated fixture restores the working folder
    result = invoke(runner, "eval", "--weights", tmp_path / "models" / "VGG16.pt", "-q")
    assert result.exit_code == 0 and result.stdout.splitlines()[0].endswith("/4)")


def test_ctrl_c_during_extraction_is_one_line_that_says_what_is_kept(runner, pet, monkeypatch):
    class CtrlC(vggft.features.cache.Counter):
        def update(self, count: int) -> None:
            super().update(count)
            raise KeyboardInterrupt

    monkeypatch.setattr(vggft.features.cache, "Counter", CtrlC)
    result = invoke(runner, "train", "--set", f"data.root={pet}", *FAST, "--set", "data.eval_batch_size=4")
    assert result.exit_code == 130
    said = [line for line in result.stderr.splitlines() if "nterrupted" in line]
    assert len(said) == 1 and said[0].startswith(
        "Interrupted during extraction: the 4 rows extracted so far are kept in "
    )


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(runner, pet, monkeypatch):
    monkeypatch.setattr(vggft.utils.logs, "PLAIN_INTERVAL", 0.0)
    result = invoke(runner, "check-data", "--set", f"data.root={pet}")  # CliRunner's stderr is no terminal
    assert result.exit_code == 0, result.output
    assert "\r" not in result.stderr
    lines = result.stderr.splitlines()
    progress = re.compile(r"Checking images: \d+/19 img \(\d+%\), [\d.]+ (img/s|s/img)(, ETA [\dhms.]+)?")
    assert len(lines) > 10 and all(progress.fullmatch(line) for line in lines[:-1]), lines
    assert re.fullmatch(r"Done in [\d.]+s", lines[-1])  # the wall time, last


def test_curves_have_whole_epoch_ticks_and_the_best_epoch(monkeypatch, tmp_path):
    figures = []
    monkeypatch.setattr(vggft.reporting.plots, "_save", lambda fig, path: figures.append(fig) or path)
    history = [
        {"epoch": e, "train_loss": 1 / e, "train_acc": 0.5, "val_loss": 1 / e, "val_acc": a}
        for e, a in ((1, 0.5), (2, 0.9), (3, 0.7))
    ]
    vggft.reporting.plots.save_curves(history[:1], tmp_path / "one.png", best_epoch=1)
    vggft.reporting.plots.save_curves(history, tmp_path / "three.png", best_epoch=2)
    for fig in figures:
        for ax in fig.axes:
            low, high = ax.get_xlim()
            shown = [t for t in ax.get_xticks() if low <= t <= high]
            assert shown and all(float(t).is_integer() for t in shown)
    assert any(line.get_label() == "best (epoch 2)" for line in figures[1].axes[0].lines)


# --- make-demo ------------------------------------------------------------------------------------


def test_make_demo_into_a_file_is_one_line(runner, tmp_path):
    Path("afile").write_text("x")
    assert_one_line_error(
        invoke(runner, "make-demo", "afile"),
        code=6,
        names=["make-demo", "'afile'", "is a file"],
        fix="give a folder path",
    )
    assert_one_line_error(
        invoke(runner, "make-demo", "afile/demo"),
        code=6,
        names=["make-demo", "'afile/demo", "Not a directory"],
        fix="choose a writable folder",
    )
    result = invoke(runner, "make-demo", "small", "--train-per-class", "2", "--test-per-class", "1")
    assert result.exit_code == 0 and len(list(Path("small").rglob("*.jpg"))) == 6
    assert "Training images per class (sea, sun)" in _help("make-demo")


# --- senseless values -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["eval", "--topk", "0"], "1 or more"),
        (["eval", "--topk", "-1"], "1 or more"),
        (["eval", "--misclassified", "-1"], "0 (no grid) or more"),
        (["show-batch", "--count", "0"], "1 or more images"),
        (["show-batch", "--count", "-1"], "1 or more images"),
        (["summary", "--num-classes", "0"], "1 or more"),
        (["summary", "--num-classes", "-3"], "1 or more"),
        (["predict", "x.jpg", "--batch-size", "0"], "1 or more images"),
        (["predict", "x.jpg", "--topk", "0"], "1 or more"),
        (["train", "--nproc", "0"], "1 or more processes"),
        (["check-data", "--max-imbalance", "0"], "a ratio greater than 1"),
        (["check-data", "--max-imbalance", "1"], "a ratio greater than 1"),
        (["make-demo", "--train-per-class", "0"], "1 or more images"),
    ],
)
def test_senseless_values_are_one_line_exit_2(runner, args, expected):
    """The line names the option and the value given, and says what the option takes."""
    option, value = args[-2:]
    assert_one_line_error(invoke(runner, *args), code=2, names=[option, f"got {value}"], fix=expected)


def test_balanced_data_is_never_imbalanced(runner, pet, tmp_path):
    balanced = make_folder(tmp_path / "even", {"train": {"cat": 3, "dog": 3}, "test": {"cat": 1, "dog": 1}})
    result = invoke(runner, "check-data", "--set", f"data.root={balanced}", "--max-imbalance", "1.01", "-q")
    assert result.exit_code == 0, result.output
    assert "Class balance (train): balanced, 3 images per class" in result.stdout
    cfg = load_config(None, [f"data.root={balanced}"])
    report = check.check_data(cfg, max_imbalance=1.01)
    report.max_imbalance = 1.0  # a limit no option accepts: the report's own guard still holds
    assert report.imbalance == 1.0 and report.problems == []
    assert "largest" not in format_report(report)


@pytest.mark.parametrize(
    ("override", "names", "fix"),
    [
        ("model.weights=IMAGENET1K_V2", ["model.weights", "'IMAGENET1K_V2'", "vgg16"], "use one of those names"),
        ("model.weights=None", ["model.weights", "'None'"], "write null"),
        ("train.device=gpu", ["--set", "train.device", "'gpu'"], "auto, cpu, cuda, cuda:N or mps"),
    ],
)
def test_config_mistakes_are_found_before_any_work(runner, override, names, fix):
    # data.root does not exist: a check that came after the data scan would say so (exit 3) instead.
    result = invoke(runner, "train", "--set", "data.root=no/such/folder", "--set", override)
    assert_one_line_error(result, code=2, names=names, fix=fix)


# --- presets --------------------------------------------------------------------------------------


def test_presets_work_from_any_folder_and_are_listed(runner):
    assert not Path("configs").exists()  # the test's own empty folder, as outside the clone
    assert load_config("keras_gap").model.head == "gap" and load_config("pet.yaml").data.root == "data/pet"
    result = invoke(runner, "configs")
    assert result.exit_code == 0
    listed = {line.split()[0]: line for line in result.stdout.splitlines()[:-1]}
    assert sorted(listed) == presets.names() == ["demo", "keras_gap", "pet"]
    assert "The PyTorch tutorial" in listed["pet"] and "The Keras tutorial" in listed["keras_gap"]
    shown = invoke(runner, "configs", "--show", "pet").stdout
    assert shown == presets.find("pet").read_text() and yaml.safe_load(shown)["model"]["head"] == "classifier6"
    assert_one_line_error(
        invoke(runner, "configs", "--show", "nope"), code=2, names=["--show", "'nope'"], fix="demo, keras_gap, pet"
    )
    assert_one_line_error(
        invoke(runner, "summary", "--config", "configs/pet.yaml"),
        code=2,
        names=["configs/pet.yaml", "not found"],
        fix="--config pet",
    )


def test_a_file_beats_a_preset_of_the_same_name(tmp_path):
    Path("pet").write_text("train:\n  epochs: 7\n")
    assert load_config("pet").train.epochs == 7


def test_defaults_print_every_key_and_load_back(runner, tmp_path):
    result = invoke(runner, "configs", "--defaults")
    assert result.exit_code == 0
    path = tmp_path / "defaults.yaml"
    path.write_text(result.stdout)
    assert load_config(path) == Config()
    assert sorted(_dotted(yaml.safe_load(result.stdout))) == sorted(all_keys())
    assert "# (one of 'auto', 'off', 'bf16', 'fp16') Autocast:" in result.stdout  # type and doc comment
    assert max(len(line) for line in result.stdout.splitlines()) <= 106


def _dotted(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        yield from _dotted(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]


# --- tables and pictures --------------------------------------------------------------------------


def test_confusion_table_indexes_long_or_many_names():
    short = Metrics.empty(["cat", "dog"])
    short.confusion += torch.tensor([[3, 0], [1, 4]])
    assert short.confusion_table().splitlines()[0].split() == ["true", "\\", "predicted", "cat", "dog"]
    names = [f"a remarkably long class name number {i}" for i in range(15)]
    many = Metrics.empty(names)
    many.confusion += torch.arange(225).view(15, 15)
    lines = many.confusion_table().splitlines()
    assert max(len(line) for line in lines) < 110  # a name column and 15 narrow ones, not 15 columns of 40
    assert lines[0].split()[3:] == [str(i) for i in range(15)]
    assert lines[16] == "Classes:" and lines[17:] == [f"  {i:>2}  {name}" for i, name in enumerate(names)]
    assert lines[15].split()[-15:] == [str(v) for v in range(210, 225)]


def test_precision_of_a_never_predicted_class_is_n_a(runner, pet, tmp_path):
    model = tutorial_model(2)
    with torch.no_grad():
        model.classifier[6].bias.copy_(torch.tensor([50.0, -50.0]))  # always cat
    torch.save(model.state_dict(), tmp_path / "cat_only.pt")
    args = [
        "eval",
        "--weights",
        tmp_path / "cat_only.pt",
        "--set",
        f"data.root={pet}",
        "-q",
        "--set",
        "data.image_size=32",
        "--set",
        "data.resize=36",
    ]
    result = invoke(runner, *args)
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[3:5]}
    assert rows["dog"][4] == "n/a" and rows["cat"][4] == f"{300 / 7:.2f}%"
    scored = json.loads(invoke(runner, *args, "--json").stdout)
    assert scored["per_class"][1]["precision"] is None and scored["per_class"][0]["precision"] == 3 / 7


def test_eval_pictures_name_the_model_split_and_files(runner, trained, monkeypatch, tmp_path):
    confusions, grids = [], []
    real_confusion, real_grid = (
        vggft.diagnostics.evaluation.save_confusion,
        vggft.diagnostics.evaluation.save_image_grid,
    )
    monkeypatch.setattr(
        vggft.diagnostics.evaluation, "save_confusion", lambda *a, **k: confusions.append(a) or real_confusion(*a, **k)
    )
    monkeypatch.setattr(
        vggft.diagnostics.evaluation,
        "save_image_grid",
        lambda images, titles, *a, **k: grids.append(titles) or real_grid(images, titles, *a, **k),
    )
    result = invoke(runner, "eval", "--weights", trained, "--misclassified", "7", "--plots", tmp_path, "-q")
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in tmp_path.iterdir())
    assert {"VGG16.confusion_test.png", "VGG16.confusion_test_normalized.png"} <= set(written)
    (_, _, _, title, normalize), (*_, title2, normalize2) = confusions
    assert title == title2 == f"VGG16.pt on the test split: {result.stdout.splitlines()[0]}"
    assert (normalize, normalize2) == (False, True)
    correct = int(result.stdout.splitlines()[0].split("(")[1].split("/")[0])
    assert correct < 7  # the seeded tiny model gets some test images wrong: the grid of them is drawn
    (titles,) = grids  # each title ends with the file's path
    assert len(titles) == 7 - correct
    assert all(
        re.fullmatch(r"true (cat|dog)\npred (cat|dog) \(\d\.\d\d\)\ntest/(cat|dog)/\1\.\d\.jpg", t) for t in titles
    )


def test_grid_titles_fit_their_cell():
    title = (
        "true Greater Spotted Woodpecker (Dendrocopos major)\npred American Staffordshire Terrier (0.93)\n"
        "test/Greater Spotted Woodpecker (Dendrocopos major)/IMG_20230412_153000.jpg"
    )
    lines = fit_title(title).splitlines()
    assert all(len(line) <= CELL_CHARS for line in lines) and len(lines) <= 6
    assert lines[-1].endswith("/IMG_20230412_153000.jpg")  # the file name stays whole
    assert fit_title("true cat\npred dog (0.51)") == "true cat\npred dog (0.51)"


def test_summary_says_mult_adds_in_plain_units(runner):
    result = invoke(runner, "summary", "--set", "data.image_size=32")
    assert result.exit_code == 0
    assert "Units." not in result.stdout
    assert re.search(r"^Total mult-adds \((millions|billions|trillions)\): [\d.]+$", result.stdout, re.M)


# --- help -----------------------------------------------------------------------------------------


def test_help_shows_choices_and_fitting_examples():
    examples = set()
    for command in ("train", "eval", "summary", "show-batch", "check-data", "predict", "export"):
        text = _help(command)
        assert "<bool>" not in text, command
        examples.add(re.search(r"e\.g\. --set (\S+);", text)[1])
    assert len(examples) == 7  # each command's own example
    assert "<bool>" not in _help()
    assert "--split <train|val|test>" in _help("eval") and "--split <train|val|test>" in _help("show-batch")
    assert "--format -f <onnx|pt2|torchscript>" in _help("export")
    assert "path,rank,class,probability,error rows" in _help("predict")
    result = invoke(CliRunner(), "eval", "--split", "dev")
    assert result.exit_code == 2 and "'dev' is not one of 'train', 'val', 'test'" in " ".join(
        re.sub(r"[│╭╮╰╯─]", " ", result.stderr).split()
    )


# --- message nits ---------------------------------------------------------------------------------


def test_a_list_key_says_what_it_takes(runner):
    assert_one_line_error(
        invoke(runner, "summary", "--set", "data.split=[a, b, c]"),
        code=2,
        names=["--set", "data.split", "['a', 'b', 'c']"],
        fix="expected a list of numbers",
    )


def test_eval_counts_unreadable_files_of_its_split_only(runner, trained, tmp_path):
    pet = trained.parent.parent / "pet"
    (pet / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    try:
        result = invoke(runner, "eval", "--weights", trained)
        assert result.exit_code == 0, result.output
        assert "Skipping" not in result.stderr  # the broken file is in train, not in the scored test split
        (pet / "test" / "dog" / "empty.jpg").write_bytes(b"")
        result = invoke(runner, "eval", "--weights", trained)
        assert "Skipping 1 unreadable image(s) (first: " in result.stderr and "empty.jpg: empty" in result.stderr
        assert result.stdout.splitlines()[0].endswith("/7)")
    finally:
        (pet / "train" / "cat" / "broken.jpg").unlink()
        (pet / "test" / "dog" / "empty.jpg").unlink(missing_ok=True)
