"""Pictures and tables that stay readable, and cheap, however many classes there are."""

from __future__ import annotations

import csv

import torch
from PIL import Image

import vggft.reporting.plots
from vggft.reporting.metrics import Metrics
from vggft.reporting.plots import CONFUSION_DRAWN, save_confusion


def test_a_thousand_classes_draw_the_most_confused_and_write_the_rest_as_csv(tmp_path, monkeypatch):
    n = 1000
    generator = torch.Generator().manual_seed(0)
    confusion = torch.diag(torch.randint(5, 20, (n,), generator=generator))
    confusion[7, 900] += 9  # the worst mistake: class 7 taken for class 900
    figures, save = [], vggft.reporting.plots._save
    monkeypatch.setattr(vggft.reporting.plots, "_save", lambda fig, path: figures.append(fig) or save(fig, path))
    names = [f"class_{i:04d}" for i in range(n)]
    path = save_confusion(confusion, names, tmp_path / "m.confusion_test.png", "m.pt on test")
    # The picture holds CONFUSION_DRAWN of the classes, the two of the mistake among them (numbered, as they
    # are picked), a cell and a count each: drawing it costs what 30 classes cost, not what 1,000 would.
    ((ax,),) = [fig.axes for fig in figures]
    shown = [label.get_text() for label in ax.get_xticklabels()]
    assert len(shown) == CONFUSION_DRAWN < n and [label.get_text() for label in ax.get_yticklabels()] == shown
    assert {"7 class_0007", "900 class_0900"} <= set(shown)
    assert len(ax.texts) == CONFUSION_DRAWN**2 and ax.images[0].get_array().shape == (CONFUSION_DRAWN,) * 2
    assert f"{CONFUSION_DRAWN} of {n} classes, the most confused" in ax.get_title()
    with Image.open(path) as image:
        assert image.width <= 2100 and image.height <= 2100  # not a 60,000 px canvas
    rows = list(csv.reader((tmp_path / "m.confusion_test.csv").open()))
    assert len(rows) == n + 1 and rows[8][901] == "9" and rows[0][1] == "class_0000"
    pairs = Metrics(names, confusion).confused_pairs(3)
    assert pairs[0] == {"true": "class_0007", "predicted": "class_0900", "count": 9}


def test_eval_of_many_classes_points_to_the_csv_instead_of_printing_the_matrix(tmp_path, capsys):
    """Past the classes the confusion picture draws, eval's text would be rows thousands of characters wide
    (2,000 classes: 24 MB): eval prints where the whole matrix is instead; up to that, the table itself."""
    from vggft.cli import _echo_confusion

    picture = tmp_path / "m.confusion_test.png"
    picture.with_suffix(".csv").write_text("written by save_confusion beside its picture\n")
    many = [f"c{i:02d}" for i in range(CONFUSION_DRAWN + 2)]
    _echo_confusion(Metrics(many, torch.eye(len(many), dtype=torch.int64)), [picture])
    said = capsys.readouterr().out
    assert said == (
        f"Confusion matrix: {len(many)} classes, too many to print (all of it in {picture.with_suffix('.csv')}); "
        "the most confused pairs follow\n"
    )
    few = many[:CONFUSION_DRAWN]
    _echo_confusion(Metrics(few, torch.eye(len(few), dtype=torch.int64)), [picture])
    assert capsys.readouterr().out.startswith("Confusion matrix (rows: true class)\n")
