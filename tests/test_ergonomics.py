"""What a daily user types: short flags for the keys people change most, -h and -V, examples in --help."""

from __future__ import annotations

import json
import re
import shlex
import urllib.error

import pytest
import torch
import torchvision
import typer
import yaml

from conftest import HUB_FILE, assert_one_line_error, invoke
from tiny import tiny_vgg
from vggft import __version__
from vggft.cli import EXAMPLES, SHORT_FLAGS, app

TRAINING = ["train", "sweep", "lr-find", "kfold", "label-issues"]


def test_short_flags_train_exactly_as_their_set(runner, pet):
    result = invoke(
        runner, "train", "--data", pet, "--epochs", "1", "--lr", "0.02", "--batch-size", "3",
        "--image-size", "32", "--arch", "vgg11", "--weights-from", "null", "--device", "cpu", "--seed", "7",
        "--set", "data.resize=40", "-q",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    [config] = list((pet.parent / "runs").glob("*/config.yaml"))
    saved = yaml.safe_load(config.read_text())
    assert saved["data"]["root"] == str(pet) and saved["data"]["batch_size"] == 3 and saved["data"]["image_size"] == 32
    assert saved["train"]["epochs"] == 1 and saved["train"]["lr"] == 0.02 and saved["train"]["seed"] == 7
    assert saved["model"]["arch"] == "vgg11" and saved["model"]["weights"] is None
    assert saved["train"]["device"] == "cpu"
    # a log that says what ran it: versions, device, precision and threads first; the wall time last
    notes = result.stderr.splitlines()
    versions = rf"vggft {__version__} train: torch (\S+), torchvision (\S+)"
    header = re.fullmatch(rf"{versions}, device cpu, fp32 \(.+\), \d+ CPU threads", notes[0])
    assert header and header[1] == torch.__version__ and header[2] == torchvision.__version__
    assert re.fullmatch(r"Done in [\d.]+s", notes[-1])


@pytest.mark.parametrize(
    "args, names",
    [
        (["--lr", "fast"], ["--lr", "train.lr", "'fast'"]),
        (["--epochs", "0"], ["--epochs", "train.epochs"]),
        (["--arch", "vgg17"], ["--arch", "model.arch", "vgg17"]),
        (["--device", "gpu"], ["--device", "train.device"]),
    ],
)
def test_a_bad_short_flag_is_named_as_the_flag(runner, args, names):
    assert_one_line_error(invoke(runner, "train", *args), code=2, names=names, fix="expected")


@pytest.mark.parametrize("command", TRAINING)
def test_a_flag_and_a_set_of_the_same_key_are_refused(runner, command):
    result = invoke(runner, command, "--lr", "0.1", "--set", "train.lr=0.2")
    assert_one_line_error(result, code=2, names=["--lr", "--set train.lr"], fix="give one of them")


def test_a_data_path_is_taken_as_written_not_as_yaml(runner, tmp_path):
    odd = tmp_path / "[pets]: 2024"  # YAML would read a flow list, or a mapping
    result = invoke(runner, "check-data", "--data", odd)
    assert_one_line_error(result, code=3, names=[f"'{odd}' not found"], fix="set data.root")


def test_help_and_version_have_short_forms_and_every_command_shows_examples(runner):
    assert invoke(runner, "-V").stdout.strip() == f"vggft {__version__}"
    top = invoke(runner, "-h")
    assert top.exit_code == 0 and "Usage" in top.stdout and "--install-completion" in top.stdout
    for command in EXAMPLES:
        shown = invoke(runner, command, "-h")
        assert shown.exit_code == 0 and "Examples:" in shown.stdout, command


@pytest.mark.parametrize("command", sorted(EXAMPLES))
def test_every_example_uses_options_its_command_has(command):
    click_command = typer.main.get_command(app).commands[command]
    known = {opt for param in click_command.params for opt in getattr(param, "opts", [])}
    for example in EXAMPLES[command]:
        words = shlex.split(example.split("&&")[0])
        assert words[:2] == ["vggft", command], example
        unknown = [w for w in words if (w.startswith("--") or re.fullmatch("-[A-Za-z]", w)) and w not in known]
        assert not unknown, f"{example}: {unknown}"


def test_every_short_flag_is_on_every_training_command():
    commands = typer.main.get_command(app).commands
    for command in TRAINING:
        flags = {opt for param in commands[command].params for opt in getattr(param, "opts", [])}
        expected = {
            flag for param, (flag, _, _) in SHORT_FLAGS.items() if param != "seed" or command in ("train", "lr-find")
        }
        assert expected <= flags, (command, expected - flags)


# --- weights that hold what training changed ------------------------------------------------------------


@pytest.fixture(scope="module")
def full_and_light(train_once):
    """The same run saved whole and as its trained tensors only (output.full_weights: false)."""
    folder = train_once("light")
    full = folder.train("--set", "train.epochs=2", weights="models/full.pt")
    light = folder.train("--set", "train.epochs=2", "--set", "output.full_weights=false", weights="models/light.pt")
    return folder, full, light


def test_light_weights_give_the_full_files_metrics_and_predictions(runner, full_and_light):
    folder, full, light = full_and_light
    assert light.stat().st_size < full.stat().st_size / 5  # the tiny stand-in; the real VGG-16: test_cli
    for command in (["eval", "--json"], ["predict", folder.pet / "test", "--json"]):
        outputs = [invoke(runner, *command, "-w", weights, "-q") for weights in (full, light)]
        assert all(o.exit_code == 0 for o in outputs), outputs[1].output
        same = [json.loads(o.stdout) for o in outputs]
        if command[0] == "eval":
            same = [{k: v for k, v in s.items() if k != "files"} for s in same]
        assert same[0] == same[1]


def test_light_weights_say_what_is_missing_and_are_not_a_resume_point(runner, full_and_light, tmp_path, monkeypatch):
    _, _, light = full_and_light
    resumed = invoke(runner, "train", "--resume", light)
    assert_one_line_error(resumed, code=4, names=[str(light), "output.full_weights: false"], fix="last.pt")
    other = tmp_path / "other_home"  # a hub whose IMAGENET1K_V1 file holds other weights
    (other / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(99)
    torch.save(tiny_vgg("vgg16").state_dict(), other / "hub" / "checkpoints" / HUB_FILE)
    monkeypatch.setenv("TORCH_HOME", str(other))
    changed = invoke(runner, "eval", "-w", light)
    assert_one_line_error(
        changed, code=4, names=[str(light), "trained layers only", "IMAGENET1K_V1", "other base weights"]
    )
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))  # no file, and no network
    monkeypatch.setattr(torch.hub, "urlopen", lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("offline")))
    missing = invoke(runner, "predict", light.parent, "-w", light)
    assert_one_line_error(
        missing, code=4, after_notes=True, names=[str(light), "trained layers only", "could not be downloaded"]
    )
