"""Pictures and tables that stay readable, and cheap, however many classes there are."""

from __future__ import annotations

import csv
import time

import torch
from PIL import Image

from vggft.reporting.metrics import Metrics
from vggft.reporting.plots import CONFUSION_DRAWN, save_confusion


def test_a_thousand_classes_draw_the_most_confused_and_write_the_rest_as_csv(tmp_path):
    n = 1000
    generator = torch.Generator().manual_seed(0)
    confusion = torch.diag(torch.randint(5, 20, (n,), generator=generator))
    confusion[7, 900] += 9  # the worst mistake: class 7 taken for class 900
    started = time.perf_counter()
    names = [f"class_{i:04d}" for i in range(n)]
    path = save_confusion(confusion, names, tmp_path / "m.confusion_test.png", "m.pt on test")
    with Image.open(path) as image:
        assert image.width <= 2100 and image.height <= 2100  # CONFUSION_DRAWN classes, not a 60,000 px canvas
    rows = list(csv.reader((tmp_path / "m.confusion_test.csv").open()))
    assert len(rows) == n + 1 and rows[8][901] == "9" and rows[0][1] == "class_0000"
    pairs = Metrics(names, confusion).confused_pairs(3)
    assert pairs[0] == {"true": "class_0007", "predicted": "class_0900", "count": 9}
    assert time.perf_counter() - started < 30
    assert CONFUSION_DRAWN == 30
