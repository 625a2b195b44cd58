"""``output.tensorboard: true``: the run's numbers as TensorBoard events, beside metrics.csv.

Each epoch writes the scalars of its metrics.csv row (step = epoch) and flushes, so an interrupted run
keeps what it did; the end of the run adds the test accuracy and loss and two images, the curves and
the test confusion matrix, drawn by the same code as curves.png and ``vggft eval``'s confusion PNG.
The ``tensorboard`` package is optional (``pip install 'vggft[tensorboard]'``): ``require`` says so in
one line before any work starts.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from vggft.reporting.metrics import Metrics
from vggft.training.loop import HISTORY_COLUMNS
from vggft.utils.errors import ConfigError

SCALARS = HISTORY_COLUMNS[1:]  # metrics.csv's columns, less epoch (the step)
FOLDER = "tensorboard"


def require() -> None:
    """A one-line ConfigError when the tensorboard package cannot be imported."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (imports the tensorboard package)
    except ImportError as err:
        raise ConfigError(
            f"output.tensorboard: needs the tensorboard package, which cannot be imported ({err}); "
            "pip install 'vggft[tensorboard]' (or tensorboard), or set output.tensorboard: false"
        ) from None


class TensorBoardLog:
    """A SummaryWriter on ``run_dir``/tensorboard with one call per epoch and one at the end."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = Path(run_dir) / FOLDER
        self.writer = SummaryWriter(log_dir=str(self.folder))

    def add_epoch(self, row: dict) -> None:
        for key in SCALARS:
            if row.get(key) is not None:
                self.writer.add_scalar(key, float(row[key]), row["epoch"])
        self.writer.flush()

    def close(
        self, history: list[dict], test: Metrics | None = None, best_epoch: int = 0, curves: Path | None = None
    ) -> None:
        """The test scalars and the curves and confusion-matrix images; then the event file is complete.

        ``curves``: the run's curves.png, already drawn from this ``history`` (drawn here if missing)."""
        from vggft.reporting.plots import save_confusion, save_curves

        step = history[-1]["epoch"] if history else 0
        with tempfile.TemporaryDirectory(prefix="vggft-tb-") as folder:
            if history:
                if curves is None or not Path(curves).is_file():
                    curves = save_curves(history, Path(folder) / "curves.png", best_epoch)
                self._image("curves", curves, step)
            if test is not None:
                self.writer.add_scalar("test_acc", test.accuracy, step)
                self.writer.add_scalar("test_loss", test.loss, step)
                picture = save_confusion(test.confusion, test.class_names, Path(folder) / "confusion.png")
                self._image("confusion_test", picture, step)
        self.writer.close()

    def _image(self, tag: str, png: Path, step: int) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(png) as image:
            pixels = np.asarray(image.convert("RGB"))
        self.writer.add_image(tag, pixels, step, dataformats="HWC")
