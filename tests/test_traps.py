"""What a newcomer runs into quietly: data that cannot be learned, files and names from other tools, advice
that points the wrong way. Each trap gets one line that says what happened and what to do."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import assert_one_line_error, invoke, make_folder
from tiny import tiny_vgg
from vggft.config.schema import DataConfig, ModelConfig
from vggft.data import crop_note
from vggft.model.build import build_model
from vggft.model.pretrained import pretrained_state_dict

TRAINING = [
    ["train"],
    ["sweep", "--grid", "train.lr=0.1,0.01"],
    ["lr-find"],
    ["kfold"],
    ["label-issues"],
]


def _sets(root) -> list[str]:
    return ["--set", f"data.root={root}", "--set", "model.weights=null", "--set", "data.image_size=32"]


@pytest.fixture(scope="module")
def one_class(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("one") / "sevens", {"train": {"cat": 3}, "test": {"cat": 2}})


@pytest.mark.parametrize("command", TRAINING, ids=lambda c: c[0])
def test_every_command_that_trains_refuses_one_class(runner, one_class, command):
    result = invoke(runner, *command, *_sets(one_class))
    assert_one_line_error(
        result, code=3, names=[str(one_class / "train"), "'cat'"], fix="at least two", after_notes=True
    )


def test_check_data_says_one_class_cannot_be_learned(runner, one_class):
    result = invoke(runner, "check-data", *_sets(one_class))
    assert result.exit_code == 1, result.output
    assert "only one class, 'cat'" in result.stdout.splitlines()[-1]


def test_a_root_one_level_too_high_is_named_with_the_root_to_use(runner, tmp_path):
    make_folder(tmp_path / "datasets" / "pets", {"train": {"cat": 3, "dog": 3}, "test": {"cat": 2, "dog": 2}})
    result = invoke(runner, "train", *_sets(tmp_path / "datasets"))
    assert_one_line_error(
        result, code=3, names=["one level too high"], fix=f"set data.root to {tmp_path}/datasets/pets"
    )


def test_split_folders_taken_for_classes_are_called_splits(runner, tmp_path):
    pool = make_folder(tmp_path / "pool", {"": {"cat": 3, "dog": 3}})
    os.rename(pool / "cat", pool / "Train")
    os.rename(pool / "dog", pool / "Test")
    result = invoke(runner, "kfold", *_sets(pool))
    assert_one_line_error(result, code=3, names=["Test, Train", "named like splits"], fix="train/ and test/")
    checked = invoke(runner, "check-data", *_sets(pool))
    assert checked.exit_code == 1 and "named like splits" in checked.stdout


# --- weights files: folders, other tools' checkpoints, heads that get replaced ---------------------------


def test_a_folder_given_as_weights_names_the_weights_inside_it(runner, tmp_path, pet):
    models = tmp_path / "models"
    models.mkdir()
    for name in ("VGG16.pt", "old.pth", "notes.txt"):
        (models / name).write_bytes(b"")
    for args, what in (
        (["eval", "--weights", models], "--weights"),
        (["train", "--set", f"data.root={pet}", "--set", f"model.weights={models}"], "model.weights"),
    ):
        result = invoke(runner, *args)
        line = assert_one_line_error(
            result, code=4, names=[what, str(models), "is a folder", "VGG16.pt, old.pth"], after_notes=True
        )
        assert "notes.txt" not in line and "not found" not in line


def _wrapped(tmp_path, name: str, body: dict) -> Path:
    path = tmp_path / name
    torch.save(body, path)
    return path


def test_other_tools_checkpoints_give_model_weights_their_state_dict(tmp_path, notes):
    torch.manual_seed(5)
    state_dict = tiny_vgg("vgg16").state_dict()
    files = {
        "model": _wrapped(  # torchvision's reference scripts, their argparse options beside the model
            tmp_path, "ref.pth", {"model": state_dict, "epoch": 3, "args": argparse.Namespace(lr=0.1)}
        ),
        "state_dict": _wrapped(  # Lightning: the LightningModule's attribute name before every key
            tmp_path, "lightning.ckpt", {"state_dict": {f"model.{k}": v for k, v in state_dict.items()}, "epoch": 1}
        ),
        "model_state_dict": _wrapped(tmp_path, "tutorial.pt", {"model_state_dict": state_dict, "loss": 0.3}),
    }
    for key, path in files.items():
        loaded = pretrained_state_dict(ModelConfig(weights=str(path)))
        assert loaded.keys() == state_dict.keys() and all(torch.equal(loaded[k], state_dict[k]) for k in loaded)
        [note] = notes()
        assert f"under '{key}'" in note and str(path) in note
        assert ("'model.' prefix" in note) == (key == "state_dict")


def test_eval_names_the_key_of_a_wrapped_state_dict(runner, tmp_path):
    path = _wrapped(tmp_path, "ref.pth", {"model": tiny_vgg("vgg16").state_dict(), "epoch": 3})
    result = invoke(runner, "eval", "--weights", path)
    assert_one_line_error(result, code=4, names=[str(path), "under 'model'"], fix="['model']")


def test_a_trained_head_in_model_weights_is_said_to_be_replaced(tmp_path, notes):
    model = tiny_vgg("vgg16")
    model.classifier[6] = nn.Linear(32, 10)
    path = _wrapped(tmp_path, "ten.pth", model.state_dict())
    build_model(ModelConfig(weights=str(path)), 2, pretrained_state_dict(ModelConfig(weights=str(path))))
    assert any("10-class head" in n and "new 2-class head replaces it" in n for n in notes())
    imagenet = _wrapped(tmp_path, "imagenet.pth", tiny_vgg("vgg16").state_dict())  # the recipe: no note
    build_model(ModelConfig(weights=str(imagenet)), 2, pretrained_state_dict(ModelConfig(weights=str(imagenet))))
    assert notes() == []


def test_features_only_weights_warn_that_classifier6_trains_on_random_layers(tmp_path, notes):
    features = {k: v for k, v in tiny_vgg("vgg16").state_dict().items() if k.startswith("features.")}
    path = _wrapped(tmp_path, "features.pth", features)
    build_model(ModelConfig(weights=str(path)), 2, pretrained_state_dict(ModelConfig(weights=str(path))))
    assert any("classifier.0 and classifier.3 start random" in n and "model.head: gap" in n for n in notes())
    build_model(ModelConfig(weights=str(path), head="gap"), 2, pretrained_state_dict(ModelConfig(weights=str(path))))
    assert notes() == []


# --- names from other tools; the summary's class count --------------------------------------------------


@pytest.mark.parametrize(
    "given, meant",
    [
        ("train.learning_rate=0.01", "train.lr"),
        ("lr0=0.01", "train.lr"),
        ("imgsz=64", "data.image_size"),
        ("data.img_size=64", "data.image_size"),
        ("batch=8", "data.batch_size"),
        ("bs=8", "data.batch_size"),
        ("epochs=3", "train.epochs"),
        ("lr=0.1", "train.lr"),
        ("device=cpu", "train.device"),
        ("model=vgg16", "model.arch"),
    ],
)
def test_names_from_other_tools_get_the_vggft_key(runner, given, meant):
    result = invoke(runner, "train", "--set", given)
    assert_one_line_error(result, code=2, names=[given.split("=")[0]], fix=f"did you mean '{meant}'?")


def test_summary_takes_the_class_count_from_data_root(runner, tmp_path):
    data = make_folder(tmp_path / "three", {"train": {"cat": 1, "dog": 1, "owl": 1}, "test": {"cat": 1}})
    result = invoke(runner, "summary", "--set", f"data.root={data}")
    assert result.exit_code == 0, result.output
    assert f"a head for 3 classes (the class folders in {data}" in result.stderr
    assert _head_row(result.stdout).split()[3:5] == ["[1,", "3]"]
    fallback = invoke(runner, "summary", "--set", f"data.root={tmp_path / 'none'}")
    assert "a head for 2 classes (none found in data.root" in fallback.stderr
    assert _head_row(fallback.stdout).split()[3:5] == ["[1,", "2]"]


def _head_row(table: str) -> str:
    """torchinfo's row of the last Linear layer (the new head)."""
    return [line for line in table.splitlines() if "Linear" in line][-1]


def test_a_crop_that_keeps_a_sliver_of_each_image_is_named_with_the_resize_to_use(runner, pet):
    """image_size 32 under the default resize 256 would train on the middle 1/8 of each side."""
    result = invoke(
        runner, "train", "--set", f"data.root={pet}", "--set", "data.image_size=32", "--set", "train.epochs=1", "-q"
    )
    assert result.exit_code == 0, result.output
    note = [line for line in result.stderr.splitlines() if "centre crop keeps" in line]
    assert note == [
        "Note: data.resize 256 with data.image_size 32: the centre crop keeps 12% of each side of every image; "
        "set data.resize: 37 (the 256 -> 224 ratio) or null (squash the whole image to image_size)"
    ]
    assert crop_note(DataConfig(image_size=32, resize=37)) is None and crop_note(DataConfig(resize=256)) is None
