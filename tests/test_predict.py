"""vggft predict and vggft export on a tiny model trained once for the module through the real CLI."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import FAST, assert_error_says, assert_one_line_error, invoke, make_image, tiny_subprocess_env
from vggft.data.images import inspect_image, open_rgb
from vggft.data.transforms import eval_transform
from vggft.model.inference import load_model
from vggft.model.weights import reseal_sidecar


def _pet(weights: Path) -> Path:
    return weights.parent.parent / "pet"


def _predict_json(runner, *args):
    result = invoke(runner, "predict", *args, "--json", "-q")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_predict_agrees_with_eval(runner, trained):
    test = _pet(trained) / "test"
    rows = _predict_json(runner, test, "--weights", trained)
    assert [r["path"] for r in rows] == sorted(str(p) for p in test.rglob("*.jpg"))
    for r in rows:
        assert [t["class"] for t in r["top"]] in (["cat", "dog"], ["dog", "cat"])  # topk 5 capped at 2 classes
        assert r["top"][0]["probability"] >= r["top"][1]["probability"]
        assert sum(t["probability"] for t in r["top"]) == pytest.approx(1, abs=1e-5)
    hits = sum(r["top"][0]["class"] == Path(r["path"]).parent.name for r in rows)
    scored = json.loads(invoke(runner, "eval", "--weights", trained, "--json", "-q").stdout)
    assert scored["total"] == len(rows) == 7 and scored["correct"] == hits


def test_predict_preprocesses_as_trained(trained):
    """The sidecar's 32 px / resize 36 transform, not the 224 px default."""
    from vggft.model.inference import predict

    image = _pet(trained) / "test" / "dog" / "dog.0.jpg"
    (row,) = predict(trained, [image], topk=1)
    model = load_model(trained)
    assert (model.cfg.data.image_size, model.cfg.data.resize) == (32, 36)
    with torch.inference_mode():
        probs = torch.softmax(model.model(eval_transform(model.cfg.data)(open_rgb(image))[None]), 1)[0]
    assert row["top"][0]["class"] == model.class_names[int(probs.argmax())]
    assert row["top"][0]["probability"] == pytest.approx(float(probs.max()), abs=1e-6)


def test_predict_a_file_and_a_messy_folder(runner, trained, tmp_path):
    image = _pet(trained) / "test" / "cat" / "cat.0.jpg"
    result = invoke(runner, "predict", image, "--weights", trained, "--topk", "1", "-q")
    assert result.exit_code == 0, result.output
    header, line = result.stdout.strip().splitlines()
    assert header.split() == ["path", "top-1", "prob", "others"]
    assert re.fullmatch(rf"{re.escape(str(image))}\s+(cat|dog)\s+\d\.\d{{4}}", line)

    folder = tmp_path / "incoming"
    make_image(folder / "a.png", (200, 60, 40), seed=1)
    make_image(folder / "deeper" / "b.JPG", (40, 80, 200), seed=2, fmt="JPEG")
    make_image(folder / ".hidden" / "c.jpg", (40, 80, 200), seed=3)
    make_image(folder / ".d.jpg", (40, 80, 200), seed=4)
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    (folder / "zero.jpg").write_bytes(b"")
    result = invoke(runner, "predict", folder, "--weights", trained, "-q")
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()[1:]
    assert [line.split()[0] for line in lines] == [
        str(folder / n) for n in ("a.png", "broken.jpg", "deeper/b.JPG", "zero.jpg")
    ]
    assert "error: " in lines[1] and "error" not in lines[0] + lines[2]
    verdict = inspect_image(folder / "zero.jpg")  # the file's reason as vggft check-data gives it
    assert_error_says(lines[3].split(None, 1)[1], names=[verdict.reason, verdict.detail])
    note, skipped = result.stderr.strip().splitlines()  # weights without a val split: what they lack, one line
    assert note.startswith("Note: no conformal calibration (no sets); no novelty statistics") and "calibrate" in note
    assert skipped == "2 of 4 file(s) could not be read as images"
    rows = _predict_json(runner, folder, image, "--weights", trained, "--topk", "2")
    assert len(rows) == 5 and "error" in rows[1] and rows[1]["top"] == []


def test_predict_csv(runner, trained, tmp_path):
    out = tmp_path / "out" / "predictions.csv"
    test = _pet(trained) / "test"
    result = invoke(runner, "predict", test, "--weights", trained, "--csv", out, "-q")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == f"Wrote {out}"
    with open(out, newline="") as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == ["path", "rank", "class", "probability", "error"]
    assert len(table) == 7 * 2 and [r["rank"] for r in table[:2]] == ["1", "2"]
    assert {r["class"] for r in table} == {"cat", "dog"} and not any(r["error"] for r in table)
    assert sorted(p.name for p in out.parent.iterdir()) == ["predictions.csv"]  # no temp file left
    # --json and --csv together: stdout stays pure JSON.
    result = invoke(runner, "predict", test, "--weights", trained, "--csv", out, "--json", "-q")
    assert len(json.loads(result.stdout)) == 7 and f"Wrote {out}" in result.stderr


def test_predict_bare_state_dict_names_classes_by_index(runner, trained, tmp_path):
    bare = tmp_path / "bare.pt"
    shutil.copy(trained, bare)  # no sidecar: preprocessing from --set, classes class_0, class_1
    rows = _predict_json(
        runner,
        _pet(trained) / "test" / "cat",
        "--weights",
        bare,
        "--set",
        "data.image_size=32",
        "--set",
        "data.resize=36",
    )
    assert len(rows) == 3 and {t["class"] for t in rows[0]["top"]} == {"class_0", "class_1"}


def test_predict_missing_path_is_one_line(runner, trained):
    result = invoke(runner, "predict", _pet(trained) / "test", "no/such.jpg", "--weights", trained, "-q")
    assert_one_line_error(
        result, code=3, names=["IMAGE_OR_DIR", "'no/such.jpg'", "not found"], fix="existing image files or folders"
    )


def _real_batch(weights: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Three test images, preprocessed as trained, and the PyTorch model's logits for them."""
    model = load_model(weights)
    paths = sorted((_pet(weights) / "test").rglob("*.jpg"))[:3]
    batch = torch.stack([eval_transform(model.cfg.data)(open_rgb(p)) for p in paths])
    with torch.inference_mode():
        return batch, model.model(batch)


EXPORTED = re.compile(r"Exported (\S+) \(max \|diff\| vs PyTorch: (\S+), tolerance 1e-04\)")


def _load_torchscript(path: Path):
    extra = {"vggft.json": ""}
    return torch.jit.load(str(path), map_location="cpu", _extra_files=extra), json.loads(extra["vggft.json"])


def _load_pt2(path: Path):
    extra = {"vggft.json": ""}
    program = torch.export.load(str(path), extra_files=extra)
    return program.module(), json.loads(extra["vggft.json"])


T = 2.5  # the calibration temperature written into a copy of the module's sidecar


@pytest.fixture(scope="module")
def calibrated_copy(trained) -> Path:
    """The module's weights beside a copy of their sidecar that holds temperature T (an intended edit, so
    resealed), in a folder beside models/, so that _pet finds the images."""
    weights = trained.parent.parent / "calibrated" / "VGG16.pt"
    weights.parent.mkdir()
    shutil.copy(trained, weights)
    sidecar = json.loads(trained.with_suffix(".json").read_text())
    weights.with_suffix(".json").write_text(json.dumps({**sidecar, "temperature": T}))
    reseal_sidecar(weights)
    return weights


def _calibrated(weights: Path, logits: torch.Tensor) -> torch.Tensor:
    """What vggft predict reports for these logits: softmax(logits / T)."""
    trained = load_model(weights)
    assert trained.temperature == T
    return trained.probabilities(logits)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:'torch.load' received a zip file that looks like a TorchScript:UserWarning")
@pytest.mark.parametrize(("fmt", "load"), [("pt2", _load_pt2), ("torchscript", _load_torchscript)])
def test_export_torch_formats(runner, calibrated_copy, tmp_path, fmt, load):
    out = tmp_path / f"m.{fmt}"
    result = invoke(runner, "export", "--weights", calibrated_copy, "--format", fmt, "--out", out)
    assert result.exit_code == 0, result.output
    match = EXPORTED.fullmatch(result.stdout.strip())
    assert match and match[1] == str(out) and float(match[2]) <= 1e-4
    model, meta = load(out)
    assert meta["class_names"] == ["cat", "dog"] and meta["image_size"] == 32 and meta["mean"][0] == 0.485
    assert meta["format"] == "vggft-export/3" and meta["temperature"] == T and meta["novelty"] is None
    batch, expected = _real_batch(calibrated_copy)  # batch of 3, exported with 2: the batch axis is free
    with torch.inference_mode():
        logits, probabilities = model(batch)
    assert torch.allclose(logits, expected, atol=1e-4, rtol=0)
    assert torch.allclose(probabilities, _calibrated(calibrated_copy, expected), atol=1e-5, rtol=0)
    # Refuses to overwrite the weights it reads.
    result = invoke(runner, "export", "--weights", calibrated_copy, "--format", fmt, "--out", calibrated_copy)
    assert_one_line_error(
        result,
        code=6,
        names=["--out", f"'{calibrated_copy}'", "would overwrite the weights"],
        fix="choose another path",
    )
    # predict runs no archive that loads through pickle (either is refused, by name or by its pickle).
    result = invoke(runner, "predict", _pet(calibrated_copy) / "test", "--weights", out, "-q")
    assert_one_line_error(result, code=4, names=[f"'{out}'", "pickle"])


def test_export_onnx_without_the_extra_says_what_to_install(runner, trained, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # find_spec then reports it absent
    result = invoke(runner, "export", "--weights", trained, "--format", "onnx")
    assert_one_line_error(
        result,
        code=1,
        names=["--format onnx", "onnxruntime not installed"],
        fix='pip install "vggft[onnx]"',
    )
    assert not trained.with_name("VGG16.onnx").exists()
    # Without --format, export picks the format torch alone can write.
    out = trained.with_name("VGG16.pt2")
    result = invoke(runner, "export", "--weights", trained)
    try:
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith(f"Exported {out} ")
    finally:
        out.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def exported_onnx(calibrated_copy):
    """``vggft export --weights <calibrated_copy>`` (onnx, the default where its packages are), run once for the
    module: (the CLI's result, the path it should have written)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    return invoke(CliRunner(), "export", "--weights", calibrated_copy), calibrated_copy.with_name("VGG16.onnx")


def test_export_onnx_carries_the_temperature(exported_onnx, calibrated_copy):
    """Both outputs, logits and probabilities = softmax(logits / T), agree with PyTorch and with what vggft
    predict reports; the metadata says T. (vggft-export/1 had logits only: softmax of them was not what
    predict said.)"""
    import onnxruntime as ort

    result, out = exported_onnx
    assert "ONNX packages" not in result.stderr
    assert result.exit_code == 0, result.output
    match = EXPORTED.fullmatch(result.stdout.strip())
    assert match and match[1] == str(out) and float(match[2]) <= 1e-4
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["vggft"])
    assert meta["class_names"] == ["cat", "dog"] and meta["image_size"] == 32 and meta["temperature"] == T
    batch, expected = _real_batch(calibrated_copy)  # batch of 3: the batch axis is dynamic
    logits, probabilities = session.run(["logits", "probabilities"], {"images": batch.numpy()})
    assert torch.allclose(torch.from_numpy(logits), expected, atol=1e-4, rtol=0)
    calibrated = _calibrated(calibrated_copy, expected)
    assert torch.allclose(torch.from_numpy(probabilities), calibrated, atol=1e-5, rtol=0)
    assert (calibrated - expected.softmax(1)).abs().max() > 1e-3  # T matters for these images


def test_predict_with_the_onnx_file_prints_what_the_pt_prints(runner, exported_onnx, calibrated_copy):
    _, onnx_file = exported_onnx
    test = _pet(calibrated_copy) / "test"
    by_pt = _predict_json(runner, test, "--weights", calibrated_copy)
    by_onnx = _predict_json(runner, test, "--weights", onnx_file)
    assert len(by_onnx) == len(by_pt) == 7
    for pt, ox in zip(by_pt, by_onnx, strict=True):
        assert (ox["path"], ox["calibrated"], ox["temperature"]) == (pt["path"], True, T)
        assert [t["class"] for t in ox["top"]] == [t["class"] for t in pt["top"]]
        assert [t["probability"] for t in ox["top"]] == pytest.approx([t["probability"] for t in pt["top"]], abs=1e-5)
    texts = [invoke(runner, "predict", test, "--weights", w, "--topk", "1", "-q") for w in (calibrated_copy, onnx_file)]
    assert [r.exit_code for r in texts] == [0, 0]
    digits = re.compile(r"\d\.\d{4}")  # the same table, to the printed digits' float error
    assert digits.sub("P", texts[1].stdout) == digits.sub("P", texts[0].stdout)
    assert f"(calibrated probabilities, temperature {T:.3f})" in texts[1].stdout
    result = invoke(runner, "predict", test, "--weights", onnx_file, "--set", "train.device=cpu")
    assert_one_line_error(
        result, code=2, names=["--config/--set", f"'{onnx_file}'"], fix="leave --config and --set out"
    )


def _foreign_onnx(path: Path, metadata: str | None) -> Path:
    """A one-node ONNX model (images -> logits) that vggft export did not write, with ``metadata`` if given."""
    from onnx import TensorProto, helper, save

    io = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 2]) for name in ("images", "logits")]
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["logits"])], "foreign", io[:1], io[1:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if metadata is not None:
        helper.set_model_props(model, {"vggft": metadata})
    save(model, str(path))
    return path


@pytest.mark.parametrize(
    ("metadata", "says"),
    [(None, "no vggft metadata"), ('{"format": "vggft-export/1"}', "format 'vggft-export/1'"), ("{", "format None")],
)
def test_predict_with_an_onnx_file_vggft_did_not_write_is_one_line(runner, trained, tmp_path, metadata, says):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    foreign = _foreign_onnx(tmp_path / "foreign.onnx", metadata)
    result = invoke(runner, "predict", _pet(trained) / "test", "--weights", foreign, "-q")
    assert_one_line_error(result, code=4, names=[f"'{foreign}'", says], fix="vggft export --weights MODEL.pt")


def test_predict_with_an_onnx_file_without_onnxruntime_says_what_to_install(runner, trained, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime then fails
    onnx_file = trained.with_name("absent-runtime.onnx")
    onnx_file.write_bytes(b"")  # never read: the runtime is missing first
    try:
        result = invoke(runner, "predict", _pet(trained) / "test", "--weights", onnx_file, "-q")
    finally:
        onnx_file.unlink()
    assert_one_line_error(
        result, code=1, names=[f"'{onnx_file}'", "onnxruntime (not installed)"], fix='pip install "vggft[onnx]"'
    )


def test_inference_imports_nothing_of_training(trained):
    """Loading weights and predicting pull in no training, optimiser, distributed or feature-cache code, and
    no plotting library: a server that imports vggft.model.inference (or vggft.model.export,
    vggft.diagnostics.explain) pays for none of it."""
    code = (
        "import sys, vggft.model.inference, vggft.model.export, vggft.diagnostics.explain; "
        f"vggft.model.inference.load_model({str(trained)!r}); "
        "print(' '.join(sorted(m for m in sys.modules if m.startswith(('vggft', 'matplotlib')))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=tiny_subprocess_env()
    ).stdout.split()
    assert "vggft.model.inference" in out and "vggft.model.weights" in out and "vggft.model.build" in out
    heavy = (
        "vggft.training",
        "vggft.tuning",
        "vggft.features",
        "vggft.utils.distributed",
        "vggft.utils.rng",
        "vggft.reporting.plots",
        "matplotlib",
    )
    assert [m for m in out if any(m == h or m.startswith(h + ".") for h in heavy)] == []


def test_more_outputs_than_class_folders(runner, pet, tmp_path):
    """model.num_classes: 4 on two class folders: the spare outputs are named unused_K wherever they show."""
    weights = tmp_path / "wide.pt"
    result = invoke(
        runner,
        "train",
        "--set",
        f"data.root={pet}",
        "--set",
        f"output.weights={weights}",
        "--set",
        "model.num_classes=4",
        *FAST,
    )
    assert result.exit_code == 0, result.output
    rows = _predict_json(runner, pet / "test", "--weights", weights, "--topk", "4")
    assert {t["class"] for r in rows for t in r["top"]} == {"cat", "dog", "unused_2", "unused_3"}
    result = invoke(runner, "eval", "--weights", weights, "--misclassified", "7", "--json", "-q")
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout)
    assert [r["class"] for r in scored["per_class"]] == ["cat", "dog", "unused_2", "unused_3"]
    assert [r["support"] for r in scored["per_class"]] == [3, 4, 0, 0]
    assert sum(map(sum, scored["confusion"])) == scored["total"] == 7
