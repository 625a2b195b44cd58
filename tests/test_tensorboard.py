"""output.tensorboard: the event file holds metrics.csv's scalars and the two images; a missing package is one line."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import FAST, assert_one_line_error, invoke, make_folder


def test_event_file_holds_the_metrics_csv_scalars_and_images(runner, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = make_folder(
        tmp_path / "pet", {"train": {"cat": 6, "dog": 6}, "val": {"cat": 2, "dog": 2}, "test": {"cat": 3, "dog": 4}}
    )
    result = invoke(runner, "train", "--set", f"data.root={root}", "--set", "output.tensorboard=true", *FAST)
    assert result.exit_code == 0, result.output
    run = Path("runs/train")
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    columns = [c for c in rows[0] if c != "epoch"]
    assert set(columns) <= set(tags["scalars"]) and {"test_acc", "test_loss"} <= set(tags["scalars"])
    for column in columns:
        logged = [(e.step, e.value) for e in events.Scalars(column)]
        assert [step for step, _ in logged] == [int(r["epoch"]) for r in rows]
        for (_, value), row in zip(logged, rows, strict=True):
            assert abs(value - float(row[column])) <= 1e-6 * max(1.0, abs(float(row[column]))), column
    assert set(tags["images"]) == {"curves", "confusion_test"}
    confusion = events.Images("confusion_test")[-1]
    assert confusion.width > 100 and confusion.encoded_image_string.startswith(b"\x89PNG")
    with (
        Image.open(io.BytesIO(events.Images("curves")[-1].encoded_image_string)) as logged,
        Image.open(run / "curves.png") as drawn,
    ):  # the run's own curves.png, not drawn a second time
        assert np.array_equal(np.asarray(logged.convert("RGB")), np.asarray(drawn.convert("RGB")))


def test_off_by_default_writes_no_events(runner, pet):
    assert invoke(runner, "train", "--set", f"data.root={pet}", *FAST).exit_code == 0
    assert not Path("runs/train/tensorboard").exists()


def test_missing_package_is_one_line_before_any_work(runner, pet, monkeypatch):
    """A real import failure: None in sys.modules makes `import tensorboard` raise ImportError."""
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    result = invoke(runner, "train", "--set", f"data.root={pet}", "--set", "output.tensorboard=true", *FAST)
    assert_one_line_error(
        result, code=2, names=["output.tensorboard", "tensorboard package"], fix="pip install 'vggft[tensorboard]'"
    )
    assert not Path("runs").exists()  # nothing was started
