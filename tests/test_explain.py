"""Grad-CAM (vggft explain, eval --explain) against a hand computation; eval's top losses and confused pairs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

import vggft.diagnostics.explain
import vggft.model.inference
from conftest import CLASS_COLOURS, assert_one_line_error, invoke, make_image
from descriptor import save_descriptor
from tiny import tiny_vgg
from vggft.config.schema import ARCHS
from vggft.data.images import open_rgb
from vggft.data.transforms import eval_transform
from vggft.diagnostics.explain import grad_cam, last_relu, output_stems
from vggft.model.inference import load_model

SIZE = 64  # the last ReLU of features is 4x4 at 64 px


def _kaiming(model: nn.Module) -> nn.Module:
    """torchvision's VGG init for the convs and wide Linear weights, so that activations and gradients do not
    vanish through 13 narrow convs and the maps have something to show."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.uniform_(module.bias, -0.1, 0.1)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0, 0.3)
    return model.eval()


def _hand_cam(model: nn.Module, images: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """Grad-CAM the long way: a hook keeps features[29]'s output, autograd gives d(score)/d(that output), then
    per image and channel the mean gradient, the weighted sum, ReLU, bilinear upsampling, division by the max."""
    kept = {}

    def keep(module, inputs, output):
        output.retain_grad()
        kept["A"] = output

    handle = model.features[29].register_forward_hook(keep)
    try:
        logits = model(images.clone().requires_grad_(True))
        sum(logits[n, c] for n, c in enumerate(classes)).backward()
    finally:
        handle.remove()
    activations, gradients = kept["A"].detach(), kept["A"].grad
    maps = []
    for n in range(len(images)):
        weights = [float(gradients[n, k].mean()) for k in range(activations.shape[1])]
        cam = sum(w * activations[n, k] for k, w in enumerate(weights)).clamp(min=0)
        cam = F.interpolate(cam[None, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
        maps.append(cam / cam.max() if cam.max() > 0 else cam)
    return torch.stack(maps)


def test_grad_cam_equals_a_hand_computation_on_a_tiny_vgg16():
    torch.manual_seed(0)
    model = _kaiming(tiny_vgg("vgg16", num_classes=3))
    assert last_relu(model) == "features.29"
    images = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        predicted = model(images).argmax(1).tolist()
    cams = grad_cam(model, images)
    assert cams.maps.shape == (4, SIZE, SIZE) and cams.maps.dtype == torch.float32
    assert cams.classes.tolist() == predicted
    assert torch.allclose(cams.maps, _hand_cam(model, images, predicted), atol=1e-5)
    assert all(m.max() == 1 and m.min() >= 0 and m.std() > 0.05 for m in cams.maps)  # maps with something on them
    other = [(c + 1) % 3 for c in predicted]  # --class: another class, another map
    explained = grad_cam(model, images, other)
    assert torch.allclose(explained.maps, _hand_cam(model, images, other), atol=1e-5)
    assert not torch.allclose(explained.maps, cams.maps)


def test_grad_cam_runs_its_gradient_free_half_in_the_autocast_precision():
    torch.manual_seed(0)
    model = _kaiming(tiny_vgg("vgg16", num_classes=3))
    images = torch.randn(4, 3, SIZE, SIZE)
    seen: list[torch.dtype] = []
    hook = model.features[0].register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    exact = grad_cam(model, images)
    bf16 = grad_cam(model, images, autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    hook.remove()
    assert seen == [torch.float32, torch.bfloat16]  # the first convolution: fp32, then under bf16 autocast
    assert bf16.maps.dtype == bf16.logits.dtype == torch.float32 and torch.equal(bf16.classes, exact.classes)
    assert 0 < float((bf16.maps - exact.maps).abs().mean()) < 0.05  # the same maps, to bf16's precision


def test_a_map_without_positive_evidence_stays_zero():
    torch.manual_seed(0)
    model = _kaiming(tiny_vgg("vgg16", num_classes=2))
    with torch.no_grad():
        model.features[28].weight.zero_()
        model.features[28].bias.fill_(-1.0)  # the last ReLU's output is all zero
    cams = grad_cam(model, torch.randn(2, 3, SIZE, SIZE))
    assert torch.equal(cams.maps, torch.zeros(2, SIZE, SIZE))


@pytest.mark.parametrize("arch", ARCHS)
def test_the_last_relu_of_every_arch(arch):
    model = tiny_vgg(arch)
    name = last_relu(model)
    assert isinstance(model.features[int(name.split(".")[1])], nn.ReLU)
    assert name == f"features.{len(model.features) - 2}"  # the last layer is the fifth max pool
    assert grad_cam(model.eval(), torch.randn(1, 3, 32, 32)).maps.shape == (1, 32, 32)


def test_output_stems_are_unique():
    paths = ["a/test/cat/x.jpg", "a/test/dog/x.jpg", "b/y.png", "c/y.jpg"]
    stems = output_stems(paths)
    assert stems[0] != stems[1] and stems[2] != stems[3] and len(set(stems)) == 4
    assert output_stems(["a/cat.1.jpg"]) == ["cat.1"]


# --- the command, on weights that learnt the colours -------------------------------------------------------


@pytest.fixture(scope="module")
def models(train_once) -> dict[str, Path]:
    """Red cats and blue dogs; a test split with one red picture filed under dog (a sure mistake). A model per
    head on the colour-describing backbone, 64 px."""
    folder = train_once("explain")
    make_image(folder.pet / "test" / "dog" / "reddish.jpg", CLASS_COLOURS["cat"], seed=99)
    backbone = save_descriptor(folder.root / "descriptor.pth")
    return {
        head: folder.train(
            "--set",
            f"model.weights={backbone}",
            "--set",
            f"model.head={head}",
            "--set",
            f"data.image_size={SIZE}",
            "--set",
            f"data.resize={SIZE}",
            "--set",
            f"train.lr={lr}",
            "--set",
            "train.momentum=0.9",
            "--set",
            "train.epochs=8",
            "--quiet",
            weights=f"models/{head}.pt",
        )
        for head, lr in (("classifier6", 0.1), ("gap", 0.05))
    }


def _pet(weights: Path) -> Path:
    return weights.parent.parent / "pet"


def _disc_picture(path: Path) -> Path:
    """A red disc in the lower right of a grey picture: grey has no colour-opponent response at all."""
    image = Image.new("RGB", (SIZE, SIZE), (128, 128, 128))
    ImageDraw.Draw(image).ellipse((36, 36, 60, 60), fill=CLASS_COLOURS["cat"])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def test_explain_writes_overlay_and_map_for_each_image(runner, models, tmp_path):
    weights = models["classifier6"]  # the gap head: test_the_heatmap_is_hot_on_the_red_object
    test = _pet(weights) / "test"
    out = tmp_path / "cams"
    result = invoke(runner, "explain", test, "--weights", weights, "--out", out, "--json", "-q")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["path"] for r in rows] == sorted(str(p) for p in test.rglob("*.jpg"))
    predicted = {
        r["path"]: r["top"][0]
        for r in json.loads(invoke(runner, "predict", test, "--weights", weights, "--json", "-q").stdout)
    }
    trained = load_model(weights)
    for r in rows:
        cam = np.load(r["cam"])
        assert cam.dtype == np.float32 and cam.shape == (SIZE, SIZE)
        assert cam.min() >= 0 and cam.max() in (0, 1)
        with Image.open(r["overlay"]) as image:
            assert image.format == "PNG" and image.width > 500
        assert (r["class"], r["predicted"]) == (predicted[r["path"]]["class"],) * 2
        assert r["probability"] == pytest.approx(predicted[r["path"]]["probability"], abs=1e-5)
        image = eval_transform(trained.cfg.data)(open_rgb(r["path"]))[None]
        assert np.allclose(cam, grad_cam(trained.model, image).maps[0].numpy(), atol=1e-6)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{Path(r['path']).stem}.cam.{ext}" for r in rows for ext in ("npy", "png")
    )


def test_the_heatmap_is_hot_on_the_red_object(runner, models, tmp_path):
    picture = _disc_picture(tmp_path / "disc.jpg")
    result = invoke(
        runner, "explain", picture, "--weights", models["gap"], "--class", "cat", "--out", tmp_path, "--json", "-q"
    )
    (row,) = json.loads(result.stdout)
    cam = np.load(row["cam"])
    disc = np.zeros((SIZE, SIZE), dtype=bool)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    disc[(yy - 48) ** 2 + (xx - 48) ** 2 <= 12**2] = True
    assert row["class"] == "cat"
    assert cam[disc].mean() > 0.5 > cam[:24, :24].mean()  # hot on the disc, cold in the far grey corner


def test_explain_another_class_a_broken_file_and_clashing_names(runner, models, tmp_path):
    weights = models["classifier6"]
    folder = tmp_path / "in"
    make_image(folder / "a" / "same.jpg", CLASS_COLOURS["cat"], seed=1)
    make_image(folder / "b" / "same.jpg", CLASS_COLOURS["dog"], seed=2)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "out"
    result = invoke(runner, "explain", folder, "--weights", weights, "--class", "dog", "--out", out, "-q")
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == "1 of 3 file(s) could not be read as images"
    lines = result.stdout.strip().splitlines()
    assert lines[0].split() == ["path", "class", "prob", "overlay"]
    assert "error: " in lines[3] and lines[3].startswith(str(folder / "broken.jpg"))
    assert all(" dog " in line for line in lines[1:3])
    assert len(list(out.glob("*.cam.png"))) == len(list(out.glob("*.cam.npy"))) == 2
    result = invoke(runner, "explain", folder, "--weights", weights, "--out", folder / "broken.jpg", "-q")
    assert_one_line_error(
        result, code=6, names=["--out", f"'{folder / 'broken.jpg'}'", "is a file"], fix="give a folder"
    )
    result = invoke(runner, "explain", folder, "--weights", weights, "--class", "owl", "-q")
    assert_one_line_error(
        result, code=2, names=["--class", "'owl'", f"'{weights}'", "(cat, dog)"], fix="leave --class out"
    )


def test_explain_out_of_memory_is_one_line_naming_the_batch_size(runner, models, tmp_path, monkeypatch):
    """Grad-CAM's backward pass running out of memory, as predict's forward pass: one line, exit 7."""

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(vggft.diagnostics.explain, "grad_cam", oom)
    weights = models["gap"]
    result = invoke(
        runner, "explain", _pet(weights) / "test", "--weights", weights, "--batch-size", "4", "--out", tmp_path, "-q"
    )
    assert_one_line_error(result, code=7, names=["out of memory", "--batch-size 4"], fix="--batch-size 2")


def test_explain_loads_images_with_the_workers_of_data_num_workers(runner, models, tmp_path, monkeypatch):
    asked = []
    make_loader = vggft.model.inference.make_loader
    monkeypatch.setattr(
        vggft.model.inference,
        "make_loader",
        lambda *args, **kwargs: asked.append(kwargs["num_workers"]) or make_loader(*args, **kwargs),
    )
    weights = models["gap"]
    result = invoke(
        runner,
        "explain",
        _pet(weights) / "test",
        "--weights",
        weights,
        "--set",
        "data.num_workers=2",
        "--out",
        tmp_path,
        "-q",
    )
    assert result.exit_code == 0, result.output
    assert asked == [2]  # it always used 0


# --- eval: top losses, confused pairs, heatmaps on the grids -------------------------------------------------


def test_eval_top_losses_confused_pairs_and_heatmaps(runner, models, tmp_path):
    weights = models["classifier6"]
    plain, explained = tmp_path / "plain", tmp_path / "explained"
    result = invoke(
        runner,
        "eval",
        "--weights",
        weights,
        "--misclassified",
        "2",
        "--top-losses",
        "4",
        "--plots",
        plain,
        "--json",
        "-q",
    )
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout)
    assert scored["confused_pairs"] == [{"true": "dog", "predicted": "cat", "count": 1}]  # the red 'dog'
    assert sum(p["count"] for p in scored["confused_pairs"]) == scored["total"] - scored["correct"]
    table = list(csv.DictReader((plain / "classifier6.top_losses_test.csv").open()))
    assert list(table[0]) == ["path", "true", "predicted", "probability", "loss"] and len(table) == 4
    assert table[0]["path"].endswith("reddish.jpg") and (table[0]["true"], table[0]["predicted"]) == ("dog", "cat")
    losses = [float(r["loss"]) for r in table]
    assert losses == sorted(losses, reverse=True)
    trained = load_model(weights)
    for r, kept in zip(table, scored["top_losses"], strict=True):
        with torch.inference_mode():
            logits = trained.model(eval_transform(trained.cfg.data)(open_rgb(r["path"]))[None])[0]
        true = trained.class_names.index(r["true"])
        assert float(r["loss"]) == pytest.approx(-float(torch.log_softmax(logits, 0)[true]), abs=1e-5)
        assert float(r["probability"]) == pytest.approx(float(logits.softmax(0).max()), abs=1e-5)
        assert kept["path"] == r["path"] and kept["loss"] == pytest.approx(float(r["loss"]), abs=1e-5)
    result = invoke(
        runner,
        "eval",
        "--weights",
        weights,
        "--misclassified",
        "2",
        "--top-losses",
        "4",
        "--explain",
        "--plots",
        explained,
        "-q",
    )
    assert result.exit_code == 0, result.output
    assert "Most confused pairs (true -> predicted: count)\n  dog -> cat  1\n" in result.stdout
    for name in ("classifier6.misclassified_test.png", "classifier6.top_losses_test.png"):
        with Image.open(plain / name) as a, Image.open(explained / name) as b:
            assert a.size == b.size
            assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).mean() > 5  # the heatmaps show
        assert f"Wrote {explained / name}" in result.stdout
    result = invoke(runner, "eval", "--weights", weights, "--explain", "-q")
    assert_one_line_error(result, code=2, names=["--explain"], fix="add --misclassified N")
