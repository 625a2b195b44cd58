"""Runs, validation, resume, schedules, unfreezing, richer evaluation and plots."""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

import vggft.reporting.plots
import vggft.training.loop
from conftest import FAST, assert_one_line_error, invoke, make_folder
from vggft.config.loading import load_config
from vggft.config.schema import ModelConfig, TrainConfig
from vggft.model.build import build_model, conv_blocks
from vggft.model.inference import load_model
from vggft.training.optim import lr_factor, make_optimizer, make_scheduler
from vggft.utils.errors import OutputError


@pytest.fixture
def pet_val(tmp_path):
    return make_folder(
        tmp_path / "pet", {"train": {"cat": 6, "dog": 6}, "val": {"cat": 2, "dog": 2}, "test": {"cat": 3, "dog": 4}}
    )


def _png_ok(path: Path) -> None:
    assert path.stat().st_size > 1000
    with Image.open(path) as image:
        assert image.format == "PNG"


def test_run_folder_holds_everything(runner, pet_val):
    result = invoke(runner, "train", "--set", f"data.root={pet_val}", *FAST)
    assert result.exit_code == 0, result.output
    run = Path("runs/train")
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "metrics.csv", "last.pt", "best.pt", "curves.png"}
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"] and all(r["val_acc"] for r in rows)
    _png_ok(run / "curves.png")
    assert load_config(run / "config.yaml").train.epochs == 2
    assert "run folder runs/train" in result.stdout.splitlines()[-1]
    assert invoke(runner, "train", "--set", f"data.root={pet_val}", *FAST).exit_code == 0
    assert Path("runs/train2/last.pt").exists()  # a second run never writes into the first
    assert invoke(runner, "train", "--set", f"data.root={pet_val}", "--name", "mine", *FAST).exit_code == 0
    assert Path("runs/mine/best.pt").exists()
    # best.pt and last.pt are usable weights too.
    result = invoke(runner, "eval", "--weights", "runs/mine/best.pt", "-q")
    assert result.exit_code == 0 and result.stdout.startswith("acc@1") and "/7)" in result.stdout
    # Rebuilding a checkpoint's frozen part leaves the caller's random state alone.
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    load_model(Path("runs/mine/best.pt"))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    "failure, said",
    [
        (
            OutputError(
                "runs/train/curves.png: could not be written (No space left on device); the previous file is unchanged"
            ),
            "runs/train/curves.png: could not be written (No space left on device); the previous file is unchanged",
        ),
        (ValueError("no font"), "runs/train/curves.png: not drawn (ValueError: no font)"),
    ],
)
@pytest.mark.parametrize("pipeline", [[], ["--set", "cache=off", "--set", "data.num_workers=1"]])
def test_curves_that_cannot_be_drawn_are_said_once_the_weights_are_saved(
    runner, pet, monkeypatch, failure, said, pipeline
):
    """curves.png is drawn on a thread while the weights are written (on the main thread when loader workers
    are forked after it); when it cannot be drawn or written the run still ends well (its numbers are in
    metrics.csv), and says so in one line."""

    def fails(history, path, best_epoch=0, title=""):
        raise failure

    monkeypatch.setattr(vggft.reporting.plots, "save_curves", fails)
    result = invoke(runner, "train", "--set", f"data.root={pet}", *FAST, *pipeline)
    assert result.exit_code == 0, result.output
    assert f"{said}; metrics.csv beside it holds the same numbers" in result.stderr.splitlines()
    assert Path("models/VGG16.pt").is_file() and not Path("runs/train/curves.png").exists()


def test_best_is_the_best_val_epoch_and_early_stopping_stops(runner, pet_val, monkeypatch):
    """Val accuracy from a script (real Metrics objects: k of the 4 val images right), so the epochs that
    improve are known in advance."""
    correct = iter([1, 3, 2, 2, 3, 4])
    real = vggft.training.loop.evaluate

    def scripted(module, loader, device, precision=None, *, names, desc="", **kw):
        metrics = real(module, loader, device, precision, names=names, desc=desc, **kw)
        if desc == "Validating":
            hits = next(correct)
            metrics.confusion = torch.zeros_like(metrics.confusion)
            metrics.confusion[0, 0], metrics.confusion[1, 1] = min(hits, 2), max(hits - 2, 0)
            metrics.confusion[0, 1] = 2 - metrics.confusion[0, 0]
            metrics.confusion[1, 0] = 2 - metrics.confusion[1, 1]
        return metrics

    monkeypatch.setattr(vggft.training.loop, "evaluate", scripted)
    result = invoke(
        runner,
        "train",
        "--set",
        f"data.root={pet_val}",
        *FAST,
        "--set",
        "train.epochs=6",
        "--set",
        "train.early_stopping.patience=2",
    )
    assert result.exit_code == 0, result.output
    assert "Early stopping: no better val accuracy for 2 epoch(s); best was epoch 2" in result.stderr
    assert "Epoch   4/6" in result.stderr and "Epoch   5/6" not in result.stderr
    assert "val acc@1 75.00% (3/4)" in result.stderr
    assert torch.load("runs/train/best.pt", weights_only=True)["epoch"] == 2
    last = torch.load("runs/train/last.pt", weights_only=True)
    assert last["epoch"] == 4 and last["best"]["epoch"] == 2
    # The best epoch, not the last, is tested and saved; last.pt carries it too (the pair is one unit).
    assert "Restored the best epoch (2, val acc 75.00%) for testing and saving" in result.stderr
    best = torch.load("runs/train/best.pt", weights_only=True)["model"]
    saved = torch.load("models/VGG16.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in best.items())
    assert all(torch.equal(last["best_model"][k], v) for k, v in best.items())
    assert not all(torch.equal(saved[k], v) for k, v in last["model"].items())


def _ctrl_c_in_epoch(monkeypatch, epoch: int):
    """Ctrl-C as epoch ``epoch`` starts (the epochs before it train for real); returns the real function."""
    real, calls = vggft.training.loop.train_one_epoch, []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == epoch:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(vggft.training.loop, "train_one_epoch", interrupted)
    return real


@pytest.mark.parametrize(
    "pipeline",
    [
        ["--set", "model.head=gap"],  # cached features, no workers
        ["--set", "cache=off", "--set", "data.num_workers=1"],  # images through a persistent worker each epoch
    ],
)
def test_interrupted_and_resumed_equals_uninterrupted(runner, pet_val, monkeypatch, pipeline):
    args = [
        "--set",
        f"data.root={pet_val}",
        *FAST,
        "--set",
        "train.epochs=4",
        "--set",
        "train.momentum=0.9",
        "--set",
        "train.scheduler=cosine",
        *pipeline,
    ]
    assert invoke(runner, "train", *args, "--set", "output.weights=full.pt").exit_code == 0
    real = _ctrl_c_in_epoch(monkeypatch, 3)
    result = invoke(runner, "train", *args, "--set", "output.weights=resumed.pt")
    assert result.exit_code == 130
    assert not multiprocessing.active_children()  # the persistent worker stopped with the run, not 5 s later
    assert result.stderr.strip().splitlines()[-1] == (
        "Interrupted: runs/train2/last.pt holds epoch 2; go on with: vggft train --resume runs/train2/last.pt"
    )
    monkeypatch.setattr(vggft.training.loop, "train_one_epoch", real)
    result = invoke(runner, "train", "--resume", "runs/train2/last.pt", "-q")
    assert result.exit_code == 0, result.output
    assert "Resuming runs/train2 after epoch 2" in result.stderr
    full, resumed = torch.load("full.pt", weights_only=True), torch.load("resumed.pt", weights_only=True)
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    rows = list(csv.DictReader(open("runs/train2/metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4"]


def test_resume_refuses_a_malicious_pickle(runner, tmp_path, evil_pickle):
    payload, marker = evil_pickle
    torch.save({"format": "vggft-checkpoint/1", "x": payload}, tmp_path / "last.pt")
    result = invoke(runner, "train", "--resume", tmp_path / "last.pt")
    assert_one_line_error(
        result,
        code=4,
        names=["--resume", f"'{tmp_path / 'last.pt'}'", "pickled code or objects"],
        fix="a last.pt written by vggft train",
    )
    assert not marker.exists()


def test_schedulers_step_as_documented():
    steps = 10  # per epoch
    cosine = TrainConfig(epochs=4, scheduler="cosine", warmup_epochs=1)
    assert lr_factor(cosine, 0, steps) == pytest.approx(0.1) and lr_factor(cosine, 9, steps) == 1.0
    assert lr_factor(cosine, 10, steps) == 1.0
    assert lr_factor(cosine, 25, steps) == pytest.approx(0.5)  # half way through the 30 cosine steps
    step = TrainConfig(epochs=6, scheduler="step", step_size=2, gamma=0.5)
    assert [lr_factor(step, e * steps, steps) for e in range(6)] == [1, 1, 0.5, 0.5, 0.25, 0.25]
    assert lr_factor(TrainConfig(scheduler="none"), 37, steps) == 1.0
    model = build_model(ModelConfig(head="gap"), 2, None)
    cfg = TrainConfig(epochs=2, lr=0.1, scheduler="onecycle")
    optimizer = make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    scheduler = make_scheduler(cfg, optimizer, steps)
    seen = []
    for _ in range(2 * steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert max(seen) == pytest.approx(0.1, rel=0.05) and seen[0] < 0.01 and seen[-1] < 0.001


def test_unfreeze_gets_its_own_learning_rate(runner, pet, monkeypatch):
    model = build_model(ModelConfig(unfreeze=["block5"]), 2, None)
    backbone = [p for p in model.features.parameters() if p.requires_grad]
    head = [p for p in model.classifier.parameters() if p.requires_grad]
    optimizer = make_optimizer(TrainConfig(lr=0.01, backbone_lr=0.001), head, backbone)
    head, block = optimizer.param_groups
    assert head["lr"] == 0.01 and block["lr"] == 0.001
    assert {id(p) for p in block["params"]} == {id(p) for m in conv_blocks(model)[4] for p in m.parameters()}
    # Two-stage: epoch 1 trains the head alone; its checkpoint already holds block5 (to restore it exactly).
    real = _ctrl_c_in_epoch(monkeypatch, 2)
    result = invoke(
        runner,
        "train",
        "--set",
        f"data.root={pet}",
        *FAST,
        "--set",
        "model.unfreeze=[block5]",
        "--set",
        "train.head_only_epochs=1",
        "--set",
        "train.epochs=2",
        "--set",
        "output.weights=u.pt",
    )
    assert result.exit_code == 130, result.output
    monkeypatch.setattr(vggft.training.loop, "train_one_epoch", real)
    pretrained = torch.load(os.environ["TORCH_HOME"] + "/hub/checkpoints/vgg16-397923af.pth", weights_only=True)
    first = torch.load("runs/train/last.pt", weights_only=True)["model"]
    assert "features.21.weight" not in first
    assert torch.equal(first["features.28.weight"], pretrained["features.28.weight"])  # held, not yet trained
    result = invoke(runner, "train", "--resume", "runs/train/last.pt", "-q")
    assert result.exit_code == 0, result.output
    tuned = torch.load("u.pt", weights_only=True)
    assert not torch.equal(tuned["features.28.weight"], pretrained["features.28.weight"])  # block5 trained
    assert torch.equal(tuned["features.21.weight"], pretrained["features.21.weight"])  # block4 did not


def test_eval_reports_topk_confusion_and_worst_mistakes(runner, tmp_path):
    three = make_folder(
        tmp_path / "three", {"train": {"cat": 4, "dog": 4, "owl": 4}, "test": {"cat": 3, "dog": 2, "owl": 2}}
    )
    assert invoke(runner, "train", "--set", f"data.root={three}", *FAST).exit_code == 0
    result = invoke(runner, "eval", "--misclassified", "3", "--topk", "2", "--json", "-q")
    scores = json.loads(result.stdout)
    probabilities_top2 = scores["topk"]["acc@2"]
    result = invoke(runner, "eval", "--misclassified", "3", "--topk", "2", "-q")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    top2 = round(probabilities_top2 * 7)
    assert lines[1] == f"acc@2 {100 * top2 / 7:.2f}% ({top2}/7)"
    correct = int(lines[0].split("(")[1].split("/")[0])
    assert correct <= top2 <= 7
    assert "Confusion matrix (rows: true class)" in result.stdout
    matrix = lines[lines.index("Confusion matrix (rows: true class)") + 2 :][:3]
    counts = [[int(x) for x in row.split()[1:]] for row in matrix]
    assert sum(map(sum, counts)) == 7 and [sum(r) for r in counts] == [3, 2, 2]
    assert sum(counts[i][i] for i in range(3)) == correct
    _png_ok(Path("models/VGG16.confusion_test.png"))
    wrong = 7 - correct
    grid = Path("models/VGG16.misclassified_test.png")
    assert grid.exists() == (wrong > 0)


def test_resume_refuses_to_stretch_a_onecycle_schedule(runner, pet):
    args = ["--set", f"data.root={pet}", *FAST, "--set", "train.scheduler=onecycle"]
    assert invoke(runner, "train", *args).exit_code == 0
    result = invoke(runner, "train", "--resume", "runs/train/last.pt", "--set", "train.epochs=4")
    assert_one_line_error(
        result, code=2, after_notes=True, names=["train.epochs", "onecycle", "2 epochs"], fix="resume with that many"
    )


def test_a_run_checkpoint_as_model_weights_says_what_to_do(runner, pet):
    assert invoke(runner, "train", "--set", f"data.root={pet}", *FAST).exit_code == 0
    result = invoke(runner, "train", "--set", f"data.root={pet}", *FAST, "--set", "model.weights=runs/train/last.pt")
    assert_one_line_error(
        result,
        code=4,
        after_notes=True,
        names=["model.weights", "'runs/train/last.pt'", "run checkpoint", "not a state_dict"],
        fix="vggft train --resume runs/train/last.pt",
    )


def test_eval_scores_even_where_the_plot_cannot_go(runner, pet):
    assert invoke(runner, "train", "--set", f"data.root={pet}", *FAST).exit_code == 0
    Path("blocker").write_text("a file where a folder should be")
    result = invoke(runner, "eval", "--plots", "blocker/plots", "-q")
    assert result.exit_code == 0 and result.stdout.startswith("acc@1 ")
    assert "Confusion matrix PNG not written" in result.stderr and "--plots DIR" in result.stderr
