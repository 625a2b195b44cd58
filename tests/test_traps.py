"""What a newcomer runs into quietly: data that cannot be learned, files and names from other tools, advice
that points the wrong way. Each trap gets one line that says what happened and what to do."""

from __future__ import annotations

import os

import pytest

from conftest import assert_one_line_error, invoke, make_folder

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
