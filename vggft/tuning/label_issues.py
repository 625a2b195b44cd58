"""``vggft label-issues``: images whose given label is doubtful, by confident learning on out-of-fold
probabilities (Northcutt, Jiang and Chuang, "Confident Learning", JAIR 2021; cleanlab's
``find_label_issues(filter_by='confident_learning')`` is the reference implementation).

Per class j the threshold t_j is the mean out-of-fold probability of j over the images labelled j. An
image is counted confidently as class k when p_k >= t_k (the largest p among several such classes); it
is a suspect when that class is not its given label, unless its given label is still the most probable
one. Suspects are ranked by self-confidence (the probability of the given label), lowest first.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vggft.config.options import check_label_issues
from vggft.config.schema import Config
from vggft.data.check import MoveLog, check_move_destination, move_files, moving_out
from vggft.data.images import open_rgb
from vggft.data.transforms import eval_transform, normalization
from vggft.reporting.runs import save_results
from vggft.training.train import check_run_folder, make_run_folder
from vggft.tuning.kfold import FoldRun, run_folds, write_oof
from vggft.utils.errors import Interrupted, OutputError, VggftError
from vggft.utils.files import save_csv

TOLERANCE = 1e-6  # cleanlab's slack on the threshold comparison, and on the given label's argmax
# When the suspects are mostly the model's own mistakes. Measured with scripts/bench_label_weak.py (42 runs,
# docs/commands.md): every run under 60 % out-of-fold accuracy had a precision of 44 % or less, the good ones
# (precision 50 % or more) started at 66 % and flagged at most 12 % of the images; weak ones flagged up to 93 %.
WEAK_ACCURACY = 0.6  # out-of-fold acc@1 below this: the model is too weak to judge labels
WEAK_FLAGGED = 0.15  # more of the images flagged than this: a backstop for mass accusation at fair accuracy
MOVES_FILE = "moves.csv"  # in the run folder: what --move moved (--undo puts it back)


@dataclass
class Suspect:
    index: int  # into the samples
    given: int
    suggested: int
    self_confidence: float  # out-of-fold probability of the given label
    confidence: float  # out-of-fold probability of the suggested label
    margin: float  # p(given) - max p(other): negative when another class is more probable


def confident_thresholds(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """t_j: mean p_j over the examples labelled j (+inf for a class no example carries: never confident)."""
    thresholds = torch.full((probs.shape[1],), float("inf"), dtype=probs.dtype)
    for j in labels.unique().tolist():
        thresholds[j] = probs[labels == j, j].mean()
    return thresholds


def find_label_issues(probs: torch.Tensor, labels: torch.Tensor) -> list[Suspect]:
    """The suspects among ``labels`` given out-of-fold ``probs`` [n, classes], most doubtful first."""
    probs = probs.double()
    confident = probs >= confident_thresholds(probs, labels) - TOLERANCE
    count = confident.sum(dim=1)
    guess = torch.where(count > 1, probs.argmax(dim=1), confident.double().argmax(dim=1))
    flagged = (count > 0) & (guess != labels)
    nudged = probs.clone()
    nudged[torch.arange(len(labels)), labels] += TOLERANCE
    flagged &= nudged.argmax(dim=1) != labels  # the given label still wins: not an issue
    suspects = []
    for i in flagged.nonzero().flatten().tolist():
        given, suggested = int(labels[i]), int(guess[i])
        others = torch.cat([probs[i, :given], probs[i, given + 1 :]])
        suspects.append(
            Suspect(
                i,
                given,
                suggested,
                float(probs[i, given]),
                float(probs[i, suggested]),
                float(probs[i, given] - others.max()),
            )
        )
    return sorted(suspects, key=lambda s: (s.self_confidence, s.margin, s.index))


def too_weak(accuracy: float, flagged: int, images: int) -> str | None:
    """Why a model cannot be trusted to judge labels (out-of-fold ``accuracy``, ``flagged`` of ``images``
    suspected), or None: confident learning's suspects are the images the model gets wrong, so a weak model
    accuses mostly its own mistakes."""
    reasons = []
    if accuracy < WEAK_ACCURACY:
        reasons.append(f"out-of-fold acc@1 {100 * accuracy:.1f}% is below {100 * WEAK_ACCURACY:.0f}%")
    share = flagged / images if images else 0.0
    if share > WEAK_FLAGGED:
        reasons.append(f"it flags {100 * share:.1f}% of the images, more than {100 * WEAK_FLAGGED:.0f}%")
    if not reasons:
        return None
    return (
        f"the model is too weak to judge labels ({'; '.join(reasons)}): most suspects are its own mistakes; "
        "make it stronger first (pretrained model.weights, a larger data.image_size, vggft lr-find for train.lr, "
        "more train.epochs) and run label-issues again"
    )


@dataclass
class LabelIssues:
    run: FoldRun
    suspects: list[Suspect]
    out: Path
    files: list[Path]
    moved: list[tuple[Path, Path]]
    weak: str | None = None  # why the model is too weak to judge labels (``too_weak``); None: it is not
    held_back: bool = False  # --move was asked for, and the suspects were not moved because the model is weak


def label_issues(
    cfg: Config,
    *,
    folds: int = 5,
    seed: int = 0,
    out: Path | None = None,
    show: int = 16,
    move: Path | None = None,
    force: bool = False,
) -> LabelIssues:
    """Out-of-fold probabilities, confident learning, then the ranked CSV, a grid PNG and the OOF CSV in
    ``out`` (default a new run folder); ``move`` moves the suspects there for review, deleting nothing, unless
    the model is too weak to judge labels (``too_weak``) and not ``force``. The moves are listed in
    ``out``/moves.csv before the first one (``undo_moves`` puts them back), and data.root is locked from before
    the folds to the last move: a second ``--move`` on the same data is refused before any work."""
    check_label_issues(folds, show)
    if out is None:
        check_run_folder(cfg, "label_issues")
    if move is None:
        return _label_issues(cfg, folds, seed, out, show)
    check_move_destination(Path(move), cfg.data.root, "--move")  # before the folds: nothing half-done
    with moving_out(cfg.data.root, "--move"):
        found = _label_issues(cfg, folds, seed, out, show)
        found.held_back = bool(found.suspects) and found.weak is not None and not force
        if found.suspects and not found.held_back:
            found.moved = _move(found, Path(move))
    return found


def _label_issues(cfg: Config, folds: int, seed: int, out: Path | None, show: int) -> LabelIssues:
    """The folds and what they find, written to ``out`` (a new run folder if None)."""
    started = time.monotonic()
    run = run_folds(cfg, folds, seed, "label-issues")
    suspects = find_label_issues(run.probs, run.labels)
    if out is None:
        out = make_run_folder(cfg, "label_issues")
    names = run.data.names
    csv_path = save_csv(
        Path(out) / "label_issues.csv",
        ["rank", "path", "given", "suggested", "confidence", "given_probability", "margin"],
        (
            [
                rank,
                run.samples[s.index][0],
                names[s.given],
                names[s.suggested],
                f"{s.confidence:.4f}",
                f"{s.self_confidence:.4f}",
                f"{s.margin:.4f}",
            ]
            for rank, s in enumerate(suspects, 1)
        ),
    )
    files = [csv_path, write_oof(run, Path(out) / "oof.csv")]
    if suspects and show > 0:
        files.append(_grid(run, suspects[:show], cfg, Path(out) / "label_issues.png"))
    weak = too_weak(run.mean, len(suspects), len(run.samples))
    _save_summary(Path(out), cfg, run, len(suspects), weak, time.monotonic() - started)
    return LabelIssues(run, suspects, Path(out), files, [], weak)


def _move(found: LabelIssues, destination: Path) -> list[tuple[Path, Path]]:
    """Move the suspects to ``destination``, listed first in the run's moves.csv; stopped or failed midway, the
    line says how to put back what moved."""
    record = found.out / MOVES_FILE
    samples = found.run.samples
    undo = f"put them back with: vggft label-issues --undo {found.out}"
    try:
        moved = move_files(
            [samples[s.index][0] for s in found.suspects],
            found.run.data.splits.root,
            destination,
            "--move",
            record=record,
        )
    except KeyboardInterrupt:
        raise Interrupted(
            f"Interrupted: {_moved_so_far(record)} of {len(found.suspects)} file(s) were moved to {destination}, "
            f"listed in {record}; {undo}"
        ) from None
    except OutputError as err:
        raise OutputError(f"{err}; {undo}" if _moved_so_far(record) else str(err)) from None
    found.files.append(record)
    return moved


def _moved_so_far(record: Path) -> int:
    """The files ``record`` lists as moved, or as planned and found at their destination (moved as it stopped)."""
    try:
        rows = MoveLog.read(record, "--move").rows.values()
    except VggftError:
        return 0
    return sum(row[2] == "moved" or (row[2] == "planned" and Path(row[1]).exists()) for row in rows)


def _save_summary(out: Path, cfg: Config, run: FoldRun, suspects: int, weak: str | None, seconds: float) -> None:
    """results.json: what ``vggft runs`` lists of a label-issues run."""
    figures = {"folds": len(run.figures), "images": len(run.samples), "cv_acc": run.mean, "suspects": suspects}
    save_results(out, "label_issues", seconds, cfg, **figures, too_weak=weak)


def _grid(run: FoldRun, suspects: list[Suspect], cfg: Config, path: Path) -> Path:
    """The top suspects as the model saw them, titled with the given and the suggested class."""
    from vggft.reporting.plots import save_image_grid

    transform = eval_transform(cfg.data)
    names = run.data.names
    images = torch.stack([transform(open_rgb(run.samples[s.index][0])) for s in suspects])
    titles = [
        f"{os.path.basename(run.samples[s.index][0])[:24]}\n"
        f"given {names[s.given]} -> {names[s.suggested]}? {s.confidence:.2f}"
        for s in suspects
    ]
    mean, std = normalization(cfg.data)
    return save_image_grid(images, titles, mean, std, path, title_colors=["darkred"] * len(suspects))
