"""The sidecar vouches for itself: its own digest (bound to the weights' digest) names a hand edit as such,
reseal_sidecar accepts an intended one, and every field is range-checked on every load (older sidecars,
without the digest, too), in eval, predict, explain and export alike."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error, invoke
from vggft.config.loading import config_from_dict
from vggft.data.transforms import preprocessing
from vggft.model.weights import TEMPERATURE_RANGE, check_sidecar, reseal_sidecar
from vggft.training.calibration import LOG_T_RANGE
from vggft.utils.errors import WeightsError


def _copy(trained: Path, folder: Path, edit: Callable[[dict], None] | None = None, seal: bool = True) -> Path:
    """The module's weights and sidecar in ``folder``, the sidecar edited by ``edit`` (by hand: not resealed);
    ``seal=False`` drops its digest, as a sidecar written before vggft sealed them."""
    weights = folder / trained.name
    weights.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(trained, weights)
    sidecar = json.loads(trained.with_suffix(".json").read_text(encoding="utf-8"))
    if edit is not None:
        edit(sidecar)
    if not seal:
        sidecar.pop("sidecar_sha256")
    weights.with_suffix(".json").write_text(json.dumps(sidecar, indent=2), encoding="utf-8")
    return weights


def _run(runner, command: str, weights: Path, tmp_path: Path, *extra: str):
    """``vggft COMMAND`` on ``weights`` (and the module's test images), quiet."""
    images = weights.parent.parent / "pet" / "test"
    args = {
        "eval": ["eval", "--weights", weights, "--plots", tmp_path / "plots"],
        "predict": ["predict", images, "--weights", weights],
        "explain": ["explain", images, "--weights", weights, "--out", tmp_path / "cams"],
        "export": ["export", "--weights", weights, "--format", "pt2", "--out", tmp_path / "m.pt2"],
    }[command]
    return invoke(runner, *args, *extra, *([] if command == "export" else ["-q"]))


@pytest.fixture
def edited(trained, tmp_path) -> Callable[..., Path]:
    """``edited(edit, seal=True)``: a copy of the module's weights whose sidecar ``edit`` changed by hand, in a
    folder of this test's own beside the module's models/ (so that ``_run`` finds the images)."""
    count = iter(range(100))

    def make(edit: Callable[[dict], None] | None = None, seal: bool = True) -> Path:
        return _copy(trained, trained.parent.parent / f"{tmp_path.name}-{next(count)}", edit, seal)

    return make


def _reverse(body: dict) -> None:
    body["class_names"].reverse()


def _data(**values) -> Callable[[dict], None]:
    """An edit of config.data, made thoroughly: the eval transform recorded beside the config agrees."""

    def edit(body: dict) -> None:
        body["config"]["data"].update(values)
        body.update(preprocessing(config_from_dict(body["config"]).data))

    return edit


def test_a_fresh_sidecar_carries_its_digest_and_loads(runner, trained, tmp_path):
    body = json.loads(trained.with_suffix(".json").read_text(encoding="utf-8"))
    assert len(body["sidecar_sha256"]) == 64 and body["weights_sha256"]
    result = _run(runner, "predict", trained, tmp_path)
    assert result.exit_code == 0, result.output


def test_a_reformatted_sidecar_is_no_edit(runner, edited, tmp_path):
    """The digest is over the content, not the bytes: re-indenting or reordering keys is not an edit."""
    weights = edited()
    body = json.loads(weights.with_suffix(".json").read_text(encoding="utf-8"))
    weights.with_suffix(".json").write_text(json.dumps(dict(reversed(body.items()))), encoding="utf-8")
    result = _run(runner, "predict", weights, tmp_path)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("command", ["eval", "predict", "explain", "export"])
def test_reversed_class_names_are_named_a_hand_edit(runner, edited, tmp_path, command):
    """Reversed names made eval score 4.44 % and predict call a five a two: now one line, exit 4."""
    weights = edited(_reverse)
    assert_one_line_error(
        _run(runner, command, weights, tmp_path),
        code=4,
        names=[str(weights.with_suffix(".json")), "edited by hand"],
        fix="vggft sidecar --accept",
    )


@pytest.mark.parametrize(
    "edit",
    [
        _data(image_size=48, resize=56),
        _data(normalize="symmetric"),
        _data(resize=None),
        lambda body: body.update(temperature=1.5),
        lambda body: body["config"]["train"].update(epochs=99),
    ],
    ids=["image_size", "normalize", "resize", "temperature", "any-key"],
)
def test_any_valid_looking_edit_is_named_a_hand_edit(runner, edited, tmp_path, edit):
    """Edits that changed every score (10.56 %, 60.28 %, 54.44 %) with nothing said: named, with the way back."""
    weights = edited(edit)
    line = assert_one_line_error(
        _run(runner, "eval", weights, tmp_path),
        code=4,
        names=[str(weights.with_suffix(".json")), "edited by hand"],
        fix="undo the edit",
    )
    assert f"vggft sidecar --accept -w {weights}" in line


@pytest.mark.parametrize("seal", [True, False], ids=["sealed", "older"])
@pytest.mark.parametrize(
    ("edit", "names", "fix"),
    [
        (lambda body: body.update(temperature=1e-300), ["temperature 1e-300", "0.001"], "remove the temperature key"),
        (lambda body: body.update(temperature=float("nan")), ["temperature nan"], "remove the temperature key"),
        (lambda body: body.update(temperature=5e3), ["temperature 5000.0"], "remove the temperature key"),
        (lambda body: body["class_names"].pop(), ["class_names", "1 name", "2 outputs"], "train again"),
        (lambda body: body["class_names"].append("owl"), ["class_names", "3 names", "2 outputs"], "train again"),
        (lambda body: body.update(class_names=["cat", "cat"]), ["class_names", "'cat' twice"], "train again"),
        (lambda body: body.update(class_names=["cat", ""]), ["class_names", "''"], "train again"),
        (lambda body: body.update(num_classes=3), ["3-class model", "2-class head"], "train again"),
        (lambda body: body["config"]["data"].update(image_size=16), ["data.image_size", "16"], "train again"),
        (lambda body: body["config"]["data"].update(normalize="none"), ["data.normalize", "none"], "train again"),
        (lambda body: body.update(image_size=48), ["image_size 48", "config's 32"], "make the two agree"),
        (lambda body: body.update(precision="fp64"), ["precision 'fp64'", "bf16"], "train again"),
    ],
    ids=[
        "tiny-temperature",
        "nan-temperature",
        "huge-temperature",
        "too-few-names",
        "too-many-names",
        "duplicate-names",
        "empty-name",
        "num_classes",
        "image_size-range",
        "normalize-value",
        "top-level-image_size",
        "precision",
    ],
)
def test_every_field_is_range_checked_sealed_or_not(runner, edited, tmp_path, seal, edit, names, fix):
    """A value no vggft run writes is named with its field, sealed or not (an older sidecar has no digest)."""
    weights = edited(edit, seal=seal)
    line = assert_one_line_error(
        _run(runner, "predict", weights, tmp_path), code=4, names=[str(weights.with_suffix(".json")), *names], fix=fix
    )
    assert "edited by hand" not in line


def test_a_tiny_temperature_is_refused_in_every_command(runner, edited, tmp_path):
    """temperature 1e-300 passed the positivity check and predict printed nan probabilities."""
    weights = edited(lambda body: body.update(temperature=1e-300))
    for command in ("eval", "predict", "explain", "export"):
        assert_one_line_error(
            _run(runner, command, weights, tmp_path),
            code=4,
            names=[str(weights.with_suffix(".json")), "temperature 1e-300"],
            fix="remove the temperature key",
        )


def test_an_older_sidecar_without_a_digest_still_loads(runner, edited, tmp_path):
    result = _run(runner, "predict", edited(seal=False), tmp_path)
    assert result.exit_code == 0, result.output


def test_an_intended_edit_is_accepted_by_resealing(runner, edited, tmp_path):
    weights = edited(lambda body: body.update(class_names=["kitty", "doggo"]))
    assert _run(runner, "predict", weights, tmp_path).exit_code == 4
    checked = invoke(runner, "sidecar", "-w", weights)
    assert_one_line_error(checked, code=4, names=["edited by hand"], fix="vggft sidecar --accept")
    accepted = invoke(runner, "sidecar", "-w", weights, "--accept")
    assert accepted.exit_code == 0 and f"Accepted {weights.with_suffix('.json')}" in accepted.stdout
    assert "passes every check (sealed)" in invoke(runner, "sidecar", "-w", weights).stdout
    result = _run(runner, "predict", weights, tmp_path, "--json")
    assert result.exit_code == 0, result.output
    assert {top["class"] for row in json.loads(result.stdout) for top in row["top"]} == {"kitty", "doggo"}
    older = edited(seal=False)  # an older sidecar is sealed the same way
    reseal_sidecar(older)
    assert len(json.loads(older.with_suffix(".json").read_text(encoding="utf-8"))["sidecar_sha256"]) == 64
    assert _run(runner, "predict", older, tmp_path).exit_code == 0


def test_resealing_refuses_what_no_load_would_accept(edited):
    weights = edited(lambda body: body.update(temperature=1e-300))
    before = weights.with_suffix(".json").read_bytes()
    with pytest.raises(WeightsError, match="temperature 1e-300"):
        reseal_sidecar(weights)
    assert weights.with_suffix(".json").read_bytes() == before
    other = edited()
    state = torch.load(other, weights_only=True)
    next(iter(state.values())).add_(1.0)
    torch.save(state, other)  # other weights: a seal must not bind the sidecar to them
    with pytest.raises(WeightsError, match="other weights"):
        reseal_sidecar(other)
    other.with_suffix(".json").unlink()
    with pytest.raises(WeightsError, match="no sidecar"):
        reseal_sidecar(other)


def test_the_temperature_range_is_the_calibration_fit_range():
    """Every temperature vggft train stores lies inside what loading accepts (the fit's search range)."""
    low, high = (math.exp(bound) for bound in LOG_T_RANGE)
    assert TEMPERATURE_RANGE[0] == pytest.approx(low) and TEMPERATURE_RANGE[1] == pytest.approx(high)


def test_fewer_names_than_outputs_only_where_the_config_asked_for_a_larger_head(trained):
    """model.num_classes larger than the class folders gives spare outputs (unused_K): fewer names, by design."""
    body = json.loads(trained.with_suffix(".json").read_text(encoding="utf-8"))
    body.update(class_names=["cat"], num_classes=2)
    with pytest.raises(WeightsError, match="1 name for the 2 outputs"):
        check_sidecar(body, trained, outputs=2)
    body["config"]["model"]["num_classes"] = 2
    check_sidecar(body, trained, outputs=2)
