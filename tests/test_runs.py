"""Runs you can compare: every run folder's results.json, and ``vggft runs``, the table of them all, through
the real CLI on a runs folder holding two train runs, a kfold run, a killed run, a damaged one and a stranger."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import FAST, assert_one_line_error, invoke
from vggft import __version__
from vggft.utils.files import file_digest


@pytest.fixture(scope="module")
def runs(train_once) -> Path:
    """runs/: 'slow' and 'fast' (train.lr apart), a sweep, a kfold and a label-issues run, 'killed'
    (config.yaml and metrics.csv, no results.json), 'damaged' (a results.json cut short) and 'photos' (not a
    run at all)."""
    folder = train_once("runs")
    folder.train(*FAST, "--name", "slow", "--set", "train.lr=0.0001", weights="models/slow.pt")
    folder.train(*FAST, "--name", "fast", "--set", "train.lr=0.01", weights="models/fast.pt")
    data = ["--set", f"data.root={folder.pet}", "--set", "data.image_size=32", "--set", "data.resize=36"]
    folder.run("kfold", *data, "--set", "train.epochs=2", "--folds", "2", "--quiet")
    folder.run("sweep", *data, "--set", "train.epochs=2", "--grid", "train.lr=0.001,0.01", "--quiet")
    folder.run("label-issues", *data, "--set", "train.epochs=2", "--folds", "2", "--show", "0", "--quiet")
    runs = folder.root / "runs"
    killed = runs / "killed"
    killed.mkdir()
    for name in ("config.yaml", "metrics.csv"):
        shutil.copy(runs / "slow" / name, killed / name)
    shutil.copytree(runs / "slow", runs / "damaged")
    (runs / "damaged" / "results.json").write_text('{"format": "vggft-results/1", "kind": "tr')
    (runs / "photos").mkdir()
    (runs / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    return runs


def listed(runs: Path, *args: str):
    return invoke(CliRunner(), "runs", "--set", f"output.runs_dir={runs}", *args)


def test_train_writes_results_json_that_agrees_with_its_sidecar(runs):
    results = json.loads((runs / "fast" / "results.json").read_text())
    weights = runs.parent / "models" / "fast.pt"
    sidecar = json.loads(weights.with_suffix(".json").read_text())
    assert results["format"] == "vggft-results/1" and results["kind"] == "train"
    assert results["vggft_version"] == __version__ and results["seconds"] > 0 and results["resumed"] is False
    assert (results["arch"], results["head"], results["classes"]) == ("vgg16", sidecar["head"], 2)
    assert results["weights"] == {"path": str(weights.resolve()), "sha256": sidecar["weights_sha256"]}
    assert results["weights"]["sha256"] == file_digest(weights)
    test = sidecar["metrics"]["test"]
    assert results["test"]["accuracy"] == test["accuracy"] and results["test"]["loss"] == test["loss"]
    assert results["test"]["images"] == test["total"] == 7 and results["images"] == {"train": 12, "val": 0, "test": 7}
    assert results["epochs"] == 2 and results["best_val"] is None  # no val split here
    # the test ECE: what vggft eval gives for the same weights
    scored = invoke(CliRunner(), "eval", "-w", weights, "--json", "-q", "--plots", runs.parent / "plots")
    assert scored.exit_code == 0, scored.output
    ece = json.loads(scored.stdout)["calibration"]["ece"]
    assert results["test"]["ece"] == pytest.approx(ece, abs=1e-6)
    kfold = json.loads((runs / "kfold" / "results.json").read_text())
    assert kfold["kind"] == "kfold" and kfold["folds"] == 2 and kfold["images"] == 12
    assert 0 <= kfold["cv_acc"] <= 1 and kfold["cv_std"] >= 0
    sweep = json.loads((runs / "sweep" / "results.json").read_text())
    assert sweep["kind"] == "sweep" and sweep["trials"] == 2 and sweep["weights"] is None
    assert sweep["best"]["values"]["train.lr"] in (0.001, 0.01) and 0 <= sweep["best"]["val_acc"] <= 1
    issues = json.loads((runs / "label_issues" / "results.json").read_text())
    assert issues["kind"] == "label_issues" and issues["images"] == 12 and issues["suspects"] >= 0


def test_runs_lists_the_runs_with_the_settings_that_differ_and_names_the_broken_ones(runs):
    result = listed(runs)
    assert result.exit_code == 0, result.output
    header, *rows = [line.split() for line in result.stdout.splitlines()]
    assert header[:6] == ["name", "date", "kind", "status", "arch", "head"]
    assert "train.lr" in header and "data.image_size" not in header and "output.name" not in header
    summary = ["trials", "best_trial", "folds", "cv_acc", "cv_std", "suspects"]  # the sweep's, kfold's, ...
    assert header[-9:] == ["val_acc", "test_acc", "seconds", *summary]
    by_name = {row[0]: dict(zip(["name", "day", "time", *header[2:]], row, strict=False)) for row in rows}
    assert sorted(by_name) == ["fast", "kfold", "killed", "label_issues", "slow", "sweep"]
    assert (by_name["slow"]["train.lr"], by_name["fast"]["train.lr"]) == ("0.0001", "0.01")
    assert by_name["killed"]["status"] == "unfinished" and by_name["killed"]["test_acc"] == "-"
    assert by_name["kfold"]["kind"] == "kfold" and by_name["kfold"]["folds"] == "2"
    assert by_name["sweep"]["trials"] == "2" and by_name["label_issues"]["suspects"] != "-"
    assert by_name["sweep"]["train.lr"] in ("0.001", "0.01")  # its best trial's, not the base config's
    fast = json.loads((runs / "fast" / "results.json").read_text())
    assert by_name["fast"]["test_acc"] == f"{100 * fast['test']['accuracy']:.2f}%"
    notes = result.stderr.strip().splitlines()
    assert len(notes) == 2, result.stderr
    assert f"{runs / 'damaged'}: not listed: results.json unreadable" in notes[0]
    assert f"{runs / 'photos'}: not listed: not a vggft run" in notes[1]


def test_runs_sorts_by_any_column_filters_by_kind_and_prints_json(runs):
    everything = json.loads(listed(runs, "--json", "--sort", "-test_acc").stdout)
    order = [run["name"] for run in everything["runs"]]
    scores = [run["test_acc"] for run in everything["runs"] if run["test_acc"] is not None]
    assert scores == sorted(scores, reverse=True) and set(order[2:]) == {"kfold", "killed", "label_issues", "sweep"}
    assert [b["name"] for b in everything["broken"]] == ["damaged", "photos"]
    fast = next(run for run in everything["runs"] if run["name"] == "fast")
    assert fast["settings"]["train.lr"] == 0.01 and fast["results"]["kind"] == "train"
    by_lr = listed(runs, "--sort", "train.lr", "--kind", "train").stdout.splitlines()
    names = [line.split()[0] for line in by_lr[1:]]
    assert set(names[:2]) == {"slow", "killed"} and names[2] == "fast"  # killed: a copy of slow (a tie)
    only = listed(runs, "--kind", "kfold").stdout.splitlines()
    assert len(only) == 2 and only[1].startswith("kfold ")


def test_runs_refuses_an_unknown_column_and_a_missing_runs_folder(runs, tmp_path):
    result = listed(runs, "--sort", "accuracy")
    line = assert_one_line_error(result, code=2, names=["--sort", "'accuracy'"], fix="test_acc", after_notes=True)
    assert "train.lr" in line and "val_acc" in line  # every column, the differing settings too
    missing = invoke(CliRunner(), "runs", "--set", f"output.runs_dir={tmp_path / 'nowhere'}")
    assert_one_line_error(missing, code=2, names=["output.runs_dir", "nowhere"], fix="--set output.runs_dir=PATH")
