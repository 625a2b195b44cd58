"""Knowing when not to trust an answer: conformal sets (the coverage guarantee on synthetic scores, the scores
and quantile by hand), novelty scores by hand, and their way from train/calibrate (sidecar + statistics file,
sealed) to predict --coverage, eval --coverage; weights without them predict as before, with a note."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error, invoke
from descriptor import save_descriptor
from vggft.model.conformal import (
    class_scores,
    conformal_quantile,
    fit_conformal,
    label_scores,
    prediction_sets,
    set_coverage,
)
from vggft.model.novelty import (
    GaussianFit,
    auroc,
    energy_score,
    fit_gaussian,
    fpr_at_tpr,
    mahalanobis_score,
    msp_score,
    novelty_threshold,
)
from vggft.model.weights import check_sidecar, novelty_path, reseal_sidecar

EXPORTED = ("0.80", "0.90", "0.95", "0.99")
LEARNS = ["--set", "data.image_size=32", "--set", "data.resize=36", "--set", "model.head=gap"]
LEARNS += ["--set", "train.lr=0.05", "--set", "train.momentum=0.9", "--set", "train.epochs=4", "--quiet"]


def test_the_scores_and_the_quantile_by_hand():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    assert class_scores(probs, "lac").view(-1).tolist() == pytest.approx([0.5, 0.7, 0.8, 0.9, 0.4, 0.7])
    assert class_scores(probs, "aps").view(-1).tolist() == pytest.approx([0.5, 0.8, 1.0, 1.0, 0.6, 0.9])
    assert label_scores(probs, torch.tensor([1, 2]), "aps").tolist() == pytest.approx([0.8, 0.9])
    # Sets: most probable first; APS at 0.85 takes the classes whose running sum up to them is <= 0.85.
    assert prediction_sets(probs, 0.85, "aps") == [[0, 1], [1]]
    assert prediction_sets(probs, 0.45, "lac") == [[], [1]]
    assert prediction_sets(probs, 0.45, "aps") == [[0], [1]]  # the most probable class is always in
    assert prediction_sets(probs, None, "lac") == [[0, 1, 2], [1, 2, 0]]
    scores = torch.tensor([0.3, 0.1, 1.0, 0.5, 0.2, 0.9, 0.4, 0.8, 0.7, 0.6])
    assert conformal_quantile(scores, 0.9) == pytest.approx(1.0)  # rank ceil(11 * 0.9) = 10 of 10
    assert conformal_quantile(scores, 0.5) == pytest.approx(0.6)  # rank ceil(5.5) = 6
    assert conformal_quantile(scores, 0.8) == pytest.approx(0.9)  # rank ceil(8.8) = 9
    assert conformal_quantile(scores, 0.95) is None  # rank 11 > 10: only every class covers
    report = set_coverage([[0, 1], [1]], torch.tensor([1, 0]), ["a", "b"])
    assert report["coverage"] == 0.5 and report["mean_size"] == 1.5
    assert [r["coverage"] for r in report["per_class"]] == [0.0, 1.0]


@pytest.mark.parametrize("method", ["lac", "aps"])
def test_the_coverage_guarantee_holds_on_synthetic_scores(method):
    """A model whose probabilities are the true ones (labels drawn from them): over 300 draws of 100
    calibration and 100 test images, mean coverage is in [1 - alpha, 1 - alpha + 1/(n + 1)] (up to noise;
    aps, which always keeps the most probable class, only at least 1 - alpha)."""
    g = torch.Generator().manual_seed(0)
    trials, n, classes = 300, 100, 5
    logits = torch.randn(trials, 2 * n, classes, generator=g) * 2
    probs = logits.softmax(-1)
    labels = torch.multinomial(probs.view(-1, classes), 1, generator=g).view(trials, 2 * n)
    for coverage in (0.9, 0.95):
        covered = []
        for t in range(trials):
            fitted = fit_conformal(probs[t, :n], labels[t, :n], method)
            sets = prediction_sets(probs[t, n:], fitted["thresholds"][f"{coverage:.2f}"], method)
            covered.append(set_coverage(sets, labels[t, n:], list("abcde"))["coverage"])
        mean = sum(covered) / trials
        ceiling = coverage + 1 / (n + 1) + 0.01 if method == "lac" else 1.0  # aps keeps the top class: more
        assert coverage - 0.01 <= mean <= ceiling, (method, coverage, mean)


def test_novelty_scores_by_hand():
    logits = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    assert msp_score(logits).tolist() == pytest.approx([1 - 1 / (1 + math.exp(-2)), 0.5])
    assert energy_score(logits, 2.0).tolist() == pytest.approx(
        [-2 * math.log(math.exp(1) + 1), -2 * math.log(2 * math.exp(0.5))]
    )
    rows = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0], [10.0, 10.0], [12.0, 10.0], [10.0, 11.0]])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    stats = fit_gaussian(rows, labels, 2)
    means = torch.tensor([[2 / 3, 1 / 3], [32 / 3, 31 / 3]])
    residual = rows - means[labels]
    sigma = residual.T @ residual / 4  # n - classes degrees of freedom
    sigma += 1e-3 * sigma.diagonal().mean() * torch.eye(2)
    x = torch.tensor([[1.0, 5.0]])
    by_hand = min(float((x - m) @ torch.linalg.inv(sigma) @ (x - m).T) for m in means)
    assert mahalanobis_score(x, stats).item() == pytest.approx(by_hand, rel=1e-4)
    assert torch.allclose(stats["means"], means)
    inside, outside = torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0.3, 0.5])
    assert auroc(inside, outside) == pytest.approx((2.5 + 4) / 8)  # the tie with 0.3 counts half
    assert fpr_at_tpr(inside, outside, 0.75) == pytest.approx(0.5)  # threshold 0.325: 0.3 passes, 0.5 does not
    assert novelty_threshold(torch.arange(1.0, 21.0), 0.9) == 19.0  # rank ceil(21 * 0.9) = 19


def test_the_statistics_gathered_batch_by_batch_equal_the_rows_at_once():
    """GaussianFit folds batches in (train never holds every row); the projection spans the top principal
    directions of the rows less their class mean, as an SVD of all of them says."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(60, 8, generator=generator) * torch.arange(1.0, 9.0) + 100.0  # far from 0: the shift matters
    labels = torch.arange(60) % 3
    whole, batches = GaussianFit(4), GaussianFit(4)  # class 3 has no row
    whole.add(rows, labels)
    for start, stop in ((0, 7), (7, 31), (31, 60)):
        batches.add(rows[start:stop], labels[start:stop])
    one, many = whole.stats(dims=3), batches.stats(dims=3)
    assert batches.count == 60 and many["means"][3].isnan().all()
    x = torch.randn(5, 8, generator=generator) * 3 + 100.0
    assert torch.allclose(mahalanobis_score(x, one), mahalanobis_score(x, many), rtol=1e-4)
    residual = (rows - torch.stack([rows[labels == c].mean(0) for c in range(3)])[labels]).double()
    top = torch.linalg.svd(residual, full_matrices=False).Vh[:3].T
    projection = many["projection"].double()
    assert torch.allclose(projection @ projection.T, top @ top.T, atol=1e-4)  # the same subspace


@pytest.fixture(scope="module")
def with_val(train_once) -> Path:
    """Weights trained with a val split (so train stores the calibrations); returns the weights."""
    folder = train_once(
        "conformal", {"train": {"cat": 6, "dog": 6}, "val": {"cat": 4, "dog": 4}, "test": {"cat": 3, "dog": 4}}
    )
    shutil.copy(folder.pet / "val" / "cat" / "cat.0.jpg", folder.pet / "val" / "dog" / "twin.jpg")
    backbone = save_descriptor(folder.root / "descriptor.pth")
    return folder.train("--set", f"model.weights={backbone}", *LEARNS, weights="models/conf.pt")


def test_train_stores_the_conformal_thresholds_and_the_novelty_statistics(with_val):
    sidecar = json.loads(with_val.with_suffix(".json").read_text())
    conformal, novelty = sidecar["conformal"], sidecar["novelty"]
    assert conformal["method"] == "lac" and conformal["count"] == 9 and len(conformal["thresholds"]) == 50
    assert conformal["thresholds"]["0.95"] is None  # rank ceil(10 * 0.95) = 10 > 9 val images
    assert novelty["score"] == "mahalanobis" and novelty["stats_file"] == novelty_path(with_val).name
    assert novelty["train_count"] == 12 and novelty["threshold"] is None  # 9 val images: too few for 95 %
    stats = torch.load(novelty_path(with_val), weights_only=True)
    assert set(stats) == {"projection", "means", "whiten"} and stats["means"].shape[0] == 2


def test_predict_gives_sets_and_novelty(runner, with_val, tmp_path):
    pet = with_val.parent.parent / "pet" / "test"
    result = invoke(runner, "predict", pet, "-w", with_val, "--coverage", "0.9", "--json", "--csv", tmp_path / "p.csv")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    for row in rows:
        assert row["set"] and row["set"][0] == row["top"][0]["class"]
        assert isinstance(row["novelty"], float) and isinstance(row["novel"], bool)
    header = (tmp_path / "p.csv").read_text().splitlines()[0]
    assert header == "path,rank,class,probability,error,novelty,novel,set"
    text = invoke(runner, "predict", pet, "-w", with_val, "--coverage", "0.9").stdout
    assert "set 90%:" in text or "unsure: any of" in text
    assert "novelty" in text or "NOVEL" in text
    everything = invoke(runner, "predict", pet, "-w", with_val, "--coverage", "0.95").stdout
    assert "unsure: any of" in everything  # too few val images for 95 %: the set of every class, said plainly


def test_eval_reports_coverage_per_class(runner, with_val):
    result = invoke(runner, "eval", "-w", with_val, "--coverage", "0.9", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["coverage"]
    assert report["target"] == 0.9 and 0 <= report["coverage"] <= 1 and report["images"] == 7
    assert [r["class"] for r in report["per_class"]] == ["cat", "dog"]
    text = invoke(runner, "eval", "-w", with_val, "--coverage", "0.9").stdout
    assert "marginal" in text and "mean set size" in text


def test_bad_coverage_and_edited_statistics_are_one_line(runner, with_val, tmp_path):
    assert_one_line_error(
        invoke(runner, "predict", with_val.parent, "-w", with_val, "--coverage", "0.905"),
        code=2,
        names=["--coverage", "0.905"],
        fix="0.99",
    )
    copy = tmp_path / "copy.pt"
    shutil.copy(with_val, copy)
    shutil.copy(with_val.with_suffix(".json"), copy.with_suffix(".json"))
    body = json.loads(copy.with_suffix(".json").read_text())
    body["weights_file"] = copy.name
    body["novelty"]["stats_file"] = novelty_path(copy).name
    copy.with_suffix(".json").write_text(json.dumps(body))
    torch.save({"projection": torch.zeros(1)}, novelty_path(copy))
    reseal_sidecar(copy)
    result = invoke(runner, "predict", with_val.parent.parent / "pet" / "test", "-w", copy)
    assert_one_line_error(result, code=result.exit_code, names=[novelty_path(copy).name], fix="vggft calibrate")
    body["conformal"]["thresholds"]["0.90"] = 7.0
    with pytest.raises(Exception, match="conformal"):
        check_sidecar(body, copy)


def test_older_weights_predict_as_before_with_a_note_then_calibrate(runner, trained):
    pet = trained.parent.parent / "pet"
    result = invoke(runner, "predict", pet / "test", "-w", trained, "--json", "--coverage", "0.9")
    assert result.exit_code == 0, result.output
    assert all("novelty" not in r and "set" not in r for r in json.loads(result.stdout))
    assert "no novelty statistics" in result.stderr and "no conformal calibration" in result.stderr
    refused = invoke(runner, "calibrate", "-w", trained, "--split", "test")
    assert_one_line_error(refused, code=refused.exit_code, names=["--split test"], fix="val")
    done = invoke(runner, "calibrate", "-w", trained, "--split", "train", "--json")
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["novelty"]["score"] == "mahalanobis"
    rows = json.loads(invoke(runner, "predict", pet / "test", "-w", trained, "--json").stdout)
    assert all("novelty" in r for r in rows)


def test_the_onnx_export_carries_the_novelty_score_and_the_conformal_thresholds(runner, with_val, tmp_path):
    """A third output, novelty (the Mahalanobis statistics in the graph), and the thresholds for the exported
    levels in the metadata: predict with the .onnx gives the .pt's sets and novelty."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "conf.onnx"
    result = invoke(runner, "export", "-w", with_val, "--format", "onnx", "--out", out)
    assert result.exit_code == 0, result.output
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", "probabilities", "novelty"]
    meta = json.loads(session.get_modelmeta().custom_metadata_map["vggft"])
    sidecar = json.loads(with_val.with_suffix(".json").read_text())
    assert meta["format"] == "vggft-export/3" and meta["novelty"]["threshold"] == sidecar["novelty"]["threshold"]
    assert meta["conformal"]["thresholds"] == {k: sidecar["conformal"]["thresholds"][k] for k in EXPORTED}
    pet = with_val.parent.parent / "pet" / "test"
    by_pt = json.loads(invoke(runner, "predict", pet, "-w", with_val, "--coverage", "0.8", "--json").stdout)
    got = invoke(runner, "predict", pet, "-w", out, "--coverage", "0.8", "--json")
    assert got.exit_code == 0, got.output
    by_onnx = json.loads(got.stdout)
    assert [r["set"] for r in by_onnx] == [r["set"] for r in by_pt] and len(by_pt) == 7
    assert [r["novelty"] for r in by_onnx] == pytest.approx([r["novelty"] for r in by_pt], rel=1e-4)
    refused = invoke(runner, "predict", pet, "-w", out, "--coverage", "0.85")
    assert_one_line_error(refused, code=2, names=["--coverage", f"'{out}'", "0.80, 0.90, 0.95, 0.99"], fix=".pt")
