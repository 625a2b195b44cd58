"""Saved files across versions and honest resumes: format-1 files still load, renamed keys migrate,
a checkpoint knows its base, and --resume accepts only what can still take effect."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import vggft.config.loading
import vggft.features.cache
import vggft.model.fingerprint
import vggft.training.train
from conftest import FAST, assert_one_line_error, invoke, make_folder
from tiny import tiny_vgg
from vggft.model.checkpoints import load_checkpoint, rebuild_from_checkpoint
from vggft.model.fingerprint import FROZEN_SCHEME, fingerprint, legacy_frozen_fingerprint

FIXTURES = Path(__file__).parent / "fixtures" / "format1"


@pytest.fixture
def format1(tmp_path) -> Path:
    """vggft 0.1's files (tests/fixtures/format1) where they were written: models/tiny.{pt,json}, runs/r/last.pt,
    beside the 'pet' folder they name (relative, as format 1 stored it)."""
    make_folder(tmp_path / "pet", {"train": {"cat": 4, "dog": 4}, "test": {"cat": 2, "dog": 2}})
    (tmp_path / "models").mkdir()
    (tmp_path / "runs" / "r").mkdir(parents=True)
    shutil.copy(FIXTURES / "tiny.pt", tmp_path / "models" / "tiny.pt")
    shutil.copy(FIXTURES / "tiny.json", tmp_path / "models" / "tiny.json")
    shutil.copy(FIXTURES / "last.pt", tmp_path / "runs" / "r" / "last.pt")
    return tmp_path


def test_format1_weights_and_sidecar_still_evaluate_and_predict(runner, format1):
    assert json.loads((format1 / "models" / "tiny.json").read_text())["format"] == "vggft-weights/1"
    result = invoke(runner, "eval", "--weights", "models/tiny.pt", "-q")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("acc@1 ") and result.stdout.splitlines()[0].endswith("/4)")
    rows = json.loads(invoke(runner, "predict", "pet/test", "--weights", "models/tiny.pt", "--json", "-q").stdout)
    assert len(rows) == 4 and {t["class"] for r in rows for t in r["top"]} == {"cat", "dog"}


def test_format1_checkpoint_resumes_and_is_rewritten_in_the_new_format(runner, format1):
    result = invoke(runner, "train", "--resume", "runs/r/last.pt", "--set", "train.epochs=2", "-q")
    assert result.exit_code == 0, result.output
    assert "Resuming runs/r after epoch 1" in result.stderr
    body = torch.load(format1 / "runs" / "r" / "last.pt", weights_only=True)
    assert body["format"] == "vggft-checkpoint/2" and body["epoch"] == 2 and len(body["history"]) == 2
    assert body["frozen_fingerprint"] and body["best_model"]
    sidecar = json.loads((format1 / "models" / "tiny.json").read_text())
    assert sidecar["format"] == "vggft-weights/2" and sidecar["weights_sha256"]


def test_renamed_keys_migrate_in_saved_files_and_configs(runner, format1, monkeypatch):
    """A key renamed after a file was saved: RENAMED_KEYS maps it; the saved file and a user's YAML still load."""
    monkeypatch.setitem(vggft.config.loading.RENAMED_KEYS, "train.learning_rate", "train.lr")
    sidecar = format1 / "models" / "tiny.json"
    body = json.loads(sidecar.read_text())
    body["config"]["train"]["learning_rate"] = body["config"]["train"].pop("lr")
    sidecar.write_text(json.dumps(body))
    result = invoke(runner, "eval", "--weights", "models/tiny.pt", "-q")
    assert result.exit_code == 0, result.output
    old = format1 / "old.yaml"
    old.write_text("train:\n  learning_rate: 0.02\n")
    cfg = vggft.config.loading.load_config(old)
    assert cfg.train.lr == 0.02
    assert vggft.config.loading.load_config(None, ["train.learning_rate=0.03"]).train.lr == 0.03


@pytest.fixture
def trained_run(runner, pet):
    assert invoke(runner, "train", "--set", f"data.root={pet}", *FAST).exit_code == 0
    return Path("runs/train/last.pt")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.lr=0.5", "train.lr"),  # the optimizer state would keep the old lr while config.yaml said 0.5
        ("model.unfreeze=1", "model.unfreeze"),  # was a raw ValueError traceback
        ("model.head=gap", "model.head"),
        ("data.image_size=64", "data.image_size"),
    ],
)
def test_resume_refuses_keys_that_cannot_take_effect(runner, trained_run, override, key):
    before = trained_run.read_bytes()
    assert_one_line_error(
        invoke(runner, "train", "--resume", trained_run, "--set", override),
        code=2,
        after_notes=True,
        names=[f"--set {key}", "when resuming", "train.epochs"],
        fix="start a new run",
    )
    assert trained_run.read_bytes() == before


def test_resume_with_a_config_file_or_other_classes_is_refused(runner, trained_run, pet, tmp_path):
    config = tmp_path / "other.yaml"
    config.write_text("train:\n  lr: 0.5\n")
    assert_one_line_error(
        invoke(runner, "train", "--resume", trained_run, "--config", config),
        code=2,
        after_notes=True,
        names=["--config", str(config), "its own config"],
        fix="drop --config",
    )
    make_folder(pet, {"train": {"owl": 2}, "test": {"owl": 1}})
    assert_one_line_error(
        invoke(runner, "train", "--resume", trained_run, "--set", "train.epochs=3"),
        code=3,
        after_notes=True,
        names=["--resume", "classes ['cat', 'dog']", "['cat', 'dog', 'owl']"],
        fix="resume on the same data",
    )


def test_resume_accepts_what_takes_effect(runner, trained_run):
    result = invoke(
        runner,
        "train",
        "--resume",
        trained_run,
        "--set",
        "train.epochs=3",
        "--set",
        "output.weights=more.pt",
        "--set",
        "data.num_workers=0",
        "-q",
    )
    assert result.exit_code == 0, result.output
    assert torch.load(trained_run, weights_only=True)["epoch"] == 3 and Path("more.pt").is_file()


def test_a_checkpoint_missing_its_trainable_part_is_refused(runner, trained_run):
    body = torch.load(trained_run, weights_only=True)
    del body["model"]["classifier.6.weight"]
    torch.save(body, trained_run)
    assert_one_line_error(
        invoke(runner, "train", "--resume", trained_run, "--set", "train.epochs=3"),
        code=4,
        after_notes=True,
        names=["--resume", f"'{trained_run}'", "trainable part"],
        fix="the run's own last.pt",
    )


def test_a_checkpoint_knows_its_base_weights(runner, pet, tmp_path):
    """last.pt/best.pt hold the head; the frozen rest is rebuilt from model.weights, and must be what it was."""
    backbone = tmp_path / "backbone.pth"
    torch.manual_seed(1)
    torch.save(tiny_vgg().state_dict(), backbone)
    assert (
        invoke(runner, "train", "--set", f"data.root={pet}", "--set", f"model.weights={backbone}", *FAST).exit_code == 0
    )
    assert invoke(runner, "eval", "--weights", "runs/train/best.pt", "-q").exit_code == 0
    torch.manual_seed(2)
    torch.save(tiny_vgg().state_dict(), backbone)  # another file under the same name
    assert_one_line_error(
        invoke(runner, "eval", "--weights", "runs/train/best.pt", "-q"),
        code=4,
        after_notes=True,
        names=["'runs/train/best.pt'", "other base weights", "model.weights", str(backbone)],
        fix="restore those weights",
    )
    assert_one_line_error(
        invoke(runner, "train", "--resume", "runs/train/last.pt", "--set", "train.epochs=3"),
        code=4,
        after_notes=True,
        names=["'runs/train/last.pt'", "other base weights"],
        fix="restore those weights",
    )


def test_a_checkpoint_with_an_earlier_frozen_fingerprint_is_still_checked(runner, trained_run):
    """last.pt files written before FROZEN_SCHEME hold one hash over every frozen tensor: they resume and
    evaluate as before, and a changed base is still refused."""
    body = torch.load(trained_run, weights_only=True)
    assert body["frozen_fingerprint"].startswith(FROZEN_SCHEME)
    model = rebuild_from_checkpoint(body, trained_run, "--weights")
    body["frozen_fingerprint"] = legacy_frozen_fingerprint(model, body["model"])
    torch.save(body, trained_run)
    assert invoke(runner, "eval", "--weights", trained_run, "-q").exit_code == 0
    result = invoke(runner, "train", "--resume", trained_run, "--set", "train.epochs=3", "-q")
    assert result.exit_code == 0, result.output
    assert torch.load(trained_run, weights_only=True)["frozen_fingerprint"].startswith(FROZEN_SCHEME)
    body["frozen_fingerprint"] = "0" * 40  # an earlier fingerprint of other weights
    torch.save(body, trained_run)
    for command in (["eval", "--weights", trained_run, "-q"], ["train", "--resume", trained_run]):
        assert_one_line_error(
            invoke(runner, *command),
            code=4,
            after_notes=True,
            names=[f"'{trained_run}'", "other base weights"],
            fix="restore those weights",
        )


def test_a_train_start_hashes_each_frozen_weight_once(runner, pet, monkeypatch):
    """The feature cache's folder name and the checkpoint's frozen fingerprint share the prefix's hash."""
    hashed = []

    def counting(tensors):
        hashed.append(sum(t.numel() * t.element_size() for t in tensors.values()))
        return fingerprint(tensors)

    monkeypatch.setattr(vggft.model.fingerprint, "fingerprint", counting)
    monkeypatch.setattr(vggft.features.cache, "fingerprint", counting)
    assert invoke(runner, "train", "--set", f"data.root={pet}", *FAST).exit_code == 0
    body = torch.load("runs/train/last.pt", weights_only=True)
    full = rebuild_from_checkpoint(body, Path("runs/train/last.pt"), "--weights").state_dict()
    frozen = sum(t.numel() * t.element_size() for k, t in full.items() if k not in body["model"])
    assert sum(hashed) == 2 * frozen  # training once, the rebuild above once: not twice each


def test_resume_reads_last_pt_once(runner, trained_run, monkeypatch):
    reads = []
    load = load_checkpoint
    monkeypatch.setattr(
        vggft.training.train, "load_checkpoint", lambda path, *args: reads.append(Path(path)) or load(path, *args)
    )
    result = invoke(runner, "train", "--resume", trained_run, "--set", "train.epochs=3", "-q")
    assert result.exit_code == 0, result.output
    assert reads == [trained_run]
