"""Calibrated confidence: ECE against its formula, the temperature fit, and the temperature's way from
train (fitted on val, stored in the sidecar) to predict (softmax(logits / T)) and eval (ECE before/after)."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import assert_one_line_error, invoke
from descriptor import save_descriptor
from vggft.data.images import open_rgb
from vggft.data.transforms import eval_transform
from vggft.model.inference import load_model
from vggft.training.calibration import (
    LOG_T_RANGE,
    calibration_summary,
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability,
)

# Learns in a few epochs: a gap head on the colour-describing stand-in backbone, 32 px.
LEARNS = [
    "--set",
    "data.image_size=32",
    "--set",
    "data.resize=36",
    "--set",
    "model.head=gap",
    "--set",
    "train.lr=0.05",
    "--set",
    "train.momentum=0.9",
    "--set",
    "train.epochs=6",
    "--quiet",
]


def test_ece_equals_the_formula_on_a_hand_made_example():
    probs = torch.tensor([[0.90, 0.10], [0.22, 0.78], [0.72, 0.28], [0.30, 0.70], [0.38, 0.62]])
    labels = torch.tensor([0, 0, 0, 0, 1])
    # Bins of width 1/15: 0.90 -> bin 13 (right), 0.78 -> 11 (wrong), 0.72 and 0.70 -> 10 (one right: accuracy
    # 0.5, mean confidence 0.71), 0.62 -> 9 (right). ECE = sum |B|/n |acc - conf|.
    expected = (abs(1 - 0.90) + abs(0 - 0.78) + 2 * abs(0.5 - 0.71) + abs(1 - 0.62)) / 5
    assert expected_calibration_error(probs, labels) == pytest.approx(expected, abs=1e-6)  # 0.336
    table = reliability(probs, labels)
    assert [k for k, n in enumerate(table.counts) if n] == [9, 10, 11, 13]
    assert table.counts[10] == 2 and table.accuracy[10] == 0.5 and table.confidence[10] == pytest.approx(0.71)
    # A confidence of exactly 1 is in the last bin; perfect, certain predictions have no error.
    certain = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert reliability(certain, torch.tensor([0, 1])).counts[14] == 2
    assert expected_calibration_error(certain, torch.tensor([0, 1])) == 0


def _overconfident(n=600, classes=3, seed=0):
    """Logits with margins of about 8 whose argmax is right only 70 % of the time."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(classes, (n,), generator=g)
    guess = torch.where(torch.rand(n, generator=g) < 0.7, labels, torch.randint(classes, (n,), generator=g))
    logits = torch.randn(n, classes, generator=g) + 8 * torch.nn.functional.one_hot(guess, classes)
    return logits, labels


def test_temperature_fit_on_overconfident_logits_is_above_one_and_lowers_nll():
    logits, labels = _overconfident()
    fit = fit_temperature(logits, labels)
    assert fit.temperature > 1 and not fit.at_bound
    assert fit.nll_after < fit.nll_before
    assert fit.nll_before == pytest.approx(nll(logits, labels)) and fit.nll_after == pytest.approx(
        nll(logits, labels, fit.temperature)
    )
    # It is the minimum: a fine grid over log T finds nothing lower.
    grid = torch.linspace(*LOG_T_RANGE, 4001).exp().tolist()
    assert fit.nll_after <= min(nll(logits, labels, t) for t in grid) + 1e-9
    before = expected_calibration_error(logits.softmax(1), labels)
    after = expected_calibration_error((logits / fit.temperature).softmax(1), labels)
    assert after < before / 2  # the ECE of overconfident logits falls a lot


def test_temperature_fit_on_a_separable_split_runs_to_its_bound():
    labels = torch.tensor([0, 1, 0, 1])
    fit = fit_temperature(torch.nn.functional.one_hot(labels, 2).float(), labels)
    assert fit.temperature == pytest.approx(math.exp(LOG_T_RANGE[0]), rel=1e-3)
    assert "separates the val images perfectly" in fit.at_bound


@pytest.fixture(scope="module")
def calibrated(train_once) -> Path:
    """Weights trained with a val split that holds the same picture under both classes (so no temperature
    makes val perfect and the fit is a real minimum); returns the weights."""
    folder = train_once(
        "calibrated", {"train": {"cat": 6, "dog": 6}, "val": {"cat": 3, "dog": 3}, "test": {"cat": 3, "dog": 4}}
    )
    shutil.copy(folder.pet / "val" / "cat" / "cat.0.jpg", folder.pet / "val" / "dog" / "twin.jpg")
    backbone = save_descriptor(folder.root / "descriptor.pth")
    return folder.train("--set", f"model.weights={backbone}", *LEARNS, weights="models/cal.pt")


def test_train_stores_the_temperature_in_the_sidecar(calibrated):
    sidecar = json.loads(calibrated.with_suffix(".json").read_text())
    assert sidecar["format"] == "vggft-weights/2"
    temperature = sidecar["temperature"]
    low, high = (math.exp(b) for b in LOG_T_RANGE)
    assert low * 1.01 < temperature < high / 1.01
    fit = sidecar["metrics"]["calibration"]
    assert fit["temperature"] == temperature and fit["count"] == 7 and fit["nll_after"] <= fit["nll_before"]
    assert load_model(calibrated).temperature == temperature


def test_predict_reports_softmax_of_logits_over_t(runner, calibrated):
    test = calibrated.parent.parent / "pet" / "test"
    result = invoke(runner, "predict", test, "--weights", calibrated, "--json", "-q")
    rows = json.loads(result.stdout)
    trained = load_model(calibrated)
    t = trained.temperature
    assert all(r["calibrated"] is True and r["temperature"] == t for r in rows)
    for r in rows:
        with torch.inference_mode():
            logits = trained.model(eval_transform(trained.cfg.data)(open_rgb(r["path"]))[None])[0]
        by_hand = torch.softmax(logits / t, dim=0)
        for top in r["top"]:
            assert top["probability"] == pytest.approx(float(by_hand[trained.names.index(top["class"])]), abs=1e-6)
    header = invoke(runner, "predict", test, "--weights", calibrated, "-q").stdout.splitlines()[0]
    assert header.split()[:4] == ["path", "top-1", "prob", "others"]
    assert header.endswith(f"(calibrated probabilities, temperature {t:.3f})")


def test_eval_reports_ece_before_and_after_and_draws_the_reliability_diagram(runner, calibrated, tmp_path):
    result = invoke(runner, "eval", "--weights", calibrated, "--split", "val", "--plots", tmp_path, "--json", "-q")
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout)
    cal = scored["calibration"]
    trained = load_model(calibrated)
    pet = calibrated.parent.parent / "pet"
    paths = sorted((pet / "val").rglob("*.jpg"), key=lambda p: (p.parent.name, str(p)))
    with torch.inference_mode():
        logits = trained.model(torch.stack([eval_transform(trained.cfg.data)(open_rgb(p)) for p in paths]))
    labels = torch.tensor([trained.class_names.index(p.parent.name) for p in paths])
    t = trained.temperature
    assert cal["temperature"] == t and cal["bins"] == 15
    assert cal["ece"] == pytest.approx(expected_calibration_error(logits.softmax(1), labels), abs=1e-5)
    assert cal["ece_calibrated"] == pytest.approx(expected_calibration_error((logits / t).softmax(1), labels), abs=1e-5)
    assert cal["nll_calibrated"] <= cal["nll"] + 1e-9  # T was fitted on this very split
    png = tmp_path / "cal.reliability_val.png"
    assert str(png) in scored["files"]
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 600
    text = invoke(runner, "eval", "--weights", calibrated, "--split", "val", "--plots", tmp_path, "-q").stdout
    assert re.search(
        rf"ECE \(15 bins\): {cal['ece']:.4f} uncalibrated, {cal['ece_calibrated']:.4f} calibrated "
        rf"\(temperature {t:.3f}\)",
        text,
    )


def test_calibrate_false_and_no_val_store_no_temperature(runner, calibrated, tmp_path):
    pet = calibrated.parent.parent / "pet"
    backbone = calibrated.parent.parent / "descriptor.pth"
    off = tmp_path / "off.pt"
    result = invoke(
        runner,
        "train",
        "--set",
        f"data.root={pet}",
        "--set",
        f"output.weights={off}",
        "--set",
        f"model.weights={backbone}",
        "--set",
        "train.calibrate=false",
        *LEARNS,
    )
    assert result.exit_code == 0, result.output
    assert "Calibration" not in result.stderr
    assert json.loads(off.with_suffix(".json").read_text())["temperature"] is None
    text = invoke(runner, "eval", "--weights", off, "-q").stdout
    assert "uncalibrated (the sidecar holds no temperature" in text
    rows = json.loads(invoke(runner, "predict", pet / "test", "--weights", off, "--json", "-q").stdout)
    assert all(r["calibrated"] is False and r["temperature"] is None for r in rows)


def test_a_temperature_that_is_not_a_positive_number_is_one_line(runner, calibrated, tmp_path):
    weights = tmp_path / "bad.pt"
    shutil.copy(calibrated, weights)
    sidecar = json.loads(calibrated.with_suffix(".json").read_text())
    sidecar["temperature"] = -1
    weights.with_suffix(".json").write_text(json.dumps(sidecar))
    result = invoke(runner, "predict", calibrated.parent.parent / "pet" / "test", "--weights", weights, "-q")
    assert_one_line_error(
        result, code=4, names=[str(weights.with_suffix(".json")), "temperature -1"], fix="remove the temperature key"
    )


def test_calibration_summary_without_a_temperature_has_no_calibrated_figures():
    logits, labels = _overconfident(60)
    summary = calibration_summary(logits, labels, None)
    assert summary["temperature"] is None and "ece_calibrated" not in summary
    assert sum(summary["reliability"]["counts"]) == 60
