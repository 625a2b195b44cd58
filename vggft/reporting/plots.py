"""What people read and open: the check-data report, training curves, confusion matrices, image grids."""

from __future__ import annotations

import math
import os
import re
import statistics
from collections import Counter
from pathlib import Path

import torch

from vggft.data.check import DataReport
from vggft.data.transforms import denormalize
from vggft.reporting.metrics import shorten
from vggft.utils.files import atomic_path, save_csv
from vggft.utils.text import display_width, pad


def _subplots(*args, **kwargs):
    """A figure and its axes, without pyplot: no global figure registry, no GUI backend, nothing to close.

    matplotlib is imported here, on first use, so that commands which draw nothing (predict, export)
    do not pay for it at start-up.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=kwargs.pop("figsize", None))
    return fig, fig.subplots(*args, **kwargs)


CELL_CHARS = 30  # characters of a 9 pt title that fit over one 2.6 inch grid cell
TICK_CHARS = 24  # class names on a confusion matrix's axes are cut to this


def fit_title(title: str, width: int = CELL_CHARS) -> str:
    """Each line of ``title`` wrapped to ``width`` characters at spaces and slashes, at most two lines each:
    past that the second keeps the end ('...IMG_0042.jpg'), so long class names and paths neither overlap the
    next cell nor run off the figure, and a file name stays whole."""
    lines = []
    for line in title.splitlines():
        wrapped = _wrap(line, width)
        if len(wrapped) > 2:
            rest = "".join(wrapped[1:])
            wrapped = [wrapped[0], "..." + rest[-(width - 3) :]]
        lines += [part.strip() for part in wrapped]
    return "\n".join(lines)


def _wrap(line: str, width: int) -> list[str]:
    """Greedy wrapping that may break after a space or a slash, and inside a word only when it must."""
    pieces = [p for p in re.split(r"(?<=[ /])", line) if p]
    lines = [""]
    for piece in pieces:
        if len(lines[-1]) + len(piece.rstrip()) > width and len(piece) <= width:
            lines.append("")
        while len(lines[-1]) + len(piece) > width:  # a word longer than a line: split where the line ends
            room = width - len(lines[-1])
            lines[-1] += piece[:room]
            piece = piece[room:]
            lines.append("")
        lines[-1] += piece
    return [line for line in lines if line.strip()] or [""]


CAM_ALPHA = 0.45  # how much of the picture shows through a Grad-CAM heatmap
NO_EVIDENCE = "no evidence for this class"  # a Grad-CAM map that is all zero: nothing to tint the picture with


def save_image_grid(
    images: torch.Tensor,
    titles: list[str],
    mean,
    std,
    path: Path,
    title_colors: list[str] | None = None,
    heatmaps: torch.Tensor | None = None,
) -> Path:
    """Normalised image tensors back to real colours, one titled cell each (a heatmap in [0, 1] over each
    when ``heatmaps`` is given; an all-zero one leaves the picture untinted and its title says so), saved as PNG."""
    pixels = denormalize(images, mean, std).permute(0, 2, 3, 1).numpy()
    count = len(pixels)
    cols = min(count, 5)
    if count % cols and count % 4 == 0:
        cols = 4  # 8 or 12 images fill whole rows of four
    rows = math.ceil(count / cols)
    evidence = [heatmaps is None or bool(heatmaps[i].any()) for i in range(count)]
    titles = [fit_title(t if shown else f"{t}\n{NO_EVIDENCE}") for t, shown in zip(titles, evidence, strict=True)]
    title_lines = max(t.count("\n") + 1 for t in titles)
    fig, axes = _subplots(rows, cols, figsize=(2.6 * cols, (2.6 + 0.2 * title_lines) * rows), squeeze=False)
    for index, ax in enumerate(axes.flat):
        ax.axis("off")
        if index < count:
            ax.imshow(pixels[index])
            if heatmaps is not None and evidence[index]:
                ax.imshow(heatmaps[index].numpy(), cmap="jet", alpha=CAM_ALPHA, vmin=0, vmax=1)
            color = title_colors[index] if title_colors else "black"
            ax.set_title(titles[index], fontsize=9, color=color)
    fig.tight_layout()
    return _save(fig, path)


def save_cam_overlay(image: torch.Tensor, cam: torch.Tensor, mean, std, title: str, path: Path) -> Path:
    """The image as the model saw it, and the same image under its Grad-CAM heatmap, with a colour bar; an
    all-zero map tints nothing: the picture is shown as it is, titled NO_EVIDENCE."""
    pixels = denormalize(image[None], mean, std)[0].permute(1, 2, 0).numpy()
    fig, (left, right) = _subplots(1, 2, figsize=(8, 4.3))
    left.imshow(pixels)
    left.set_title("model input", fontsize=9)
    right.imshow(pixels)
    if cam.any():
        shown = right.imshow(cam.numpy(), cmap="jet", alpha=CAM_ALPHA, vmin=0, vmax=1)
        right.set_title("Grad-CAM", fontsize=9)
        fig.colorbar(shown, ax=right, fraction=0.046, pad=0.04)
    else:
        right.set_title(f"Grad-CAM: {NO_EVIDENCE}", fontsize=9)
    for ax in (left, right):
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def save_reliability(summary: dict, path: Path) -> Path:
    """Reliability diagram: accuracy against confidence per bin, raw and (if fitted) temperature-scaled."""
    panels = [("uncalibrated", summary["reliability"], summary["ece"])]
    if summary.get("reliability_calibrated"):
        panels.append(
            (f"temperature {summary['temperature']:.2f}", summary["reliability_calibrated"], summary["ece_calibrated"])
        )
    fig, axes = _subplots(1, len(panels), figsize=(max(5.6, 4.2 * len(panels)), 4.7), squeeze=False)
    bins = summary["bins"]
    centres = [(k + 0.5) / bins for k in range(bins)]
    for ax, (label, table, ece) in zip(axes[0], panels, strict=False):
        filled = [n > 0 for n in table["counts"]]
        ax.bar(
            [c for c, f in zip(centres, filled, strict=False) if f],
            [a for a, f in zip(table["accuracy"], filled, strict=False) if f],
            width=1 / bins,
            edgecolor="black",
            color="tab:blue",
            label="accuracy",
        )
        ax.bar(
            [c for c, f in zip(centres, filled, strict=False) if f],
            [conf - acc for conf, acc, f in zip(table["confidence"], table["accuracy"], filled, strict=False) if f],
            bottom=[a for a, f in zip(table["accuracy"], filled, strict=False) if f],
            width=1 / bins,
            fill=False,
            hatch="//",
            edgecolor="tab:red",
            label="gap to mean confidence",
        )
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top-1 probability)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{label}: ECE {ece:.3f} ({sum(table['counts'])} images)", fontsize=10)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))  # room for the shared legend below the plots
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def save_curves(history: list[dict], path: Path, best_epoch: int = 0, title: str = "") -> Path:
    """Loss and accuracy per epoch, train and (when there is one) val; the best val epoch marked; ``title``
    (the run's name, arch and head) above both."""
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    fig, (loss_ax, acc_ax) = _subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in ((loss_ax, "loss", "loss"), (acc_ax, "acc", "accuracy")):
        for split in ("train", "val"):
            values = [row.get(f"{split}_{metric}") for row in history]
            if any(v is not None for v in values):
                ax.plot(epochs, values, marker="o", label=split)
        if best_epoch and any("val_acc" in row for row in history):
            ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"best (epoch {best_epoch})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        if len(epochs) == 1:
            ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
        ax.grid(alpha=0.3)
        ax.legend()
    acc_ax.set_ylim(0, 1.02)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


# --- sweep and lr-find ---------------------------------------------------------------------------------


def save_sweep_plot(trials: list, keys: list[str], best: int, path: Path) -> Path:
    """Val accuracy of each trial: against the value when one numeric key is swept, else a bar per trial."""
    fig, ax = _subplots(figsize=(max(6.0, 0.35 * len(trials) + 3), 4.2))
    ok = [t for t in trials if t.status == "ok"]
    numeric = len(keys) == 1 and all(
        isinstance(t.values[keys[0]], (int, float)) and not isinstance(t.values[keys[0]], bool) for t in trials
    )
    if numeric and len({t.values[keys[0]] for t in ok}) > 1:
        key = keys[0]
        points = sorted((t.values[key], t.val_acc, t.number) for t in ok)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        positive = [p[0] for p in points if p[0] > 0]
        if len(positive) == len(points) and max(positive) / min(positive) >= 100:
            ax.set_xscale("log")
        winner = next(p for p in points if p[2] == best)
        ax.plot(
            [winner[0]],
            [winner[1]],
            marker="*",
            markersize=16,
            color="tab:red",
            linestyle="none",
            label=f"best: trial {best}, {key}={winner[0]:g}",
        )
        ax.set_xlabel(key)
    else:
        numbers = [t.number for t in trials]
        heights = [t.val_acc if t.status == "ok" else 0.0 for t in trials]
        colors = [
            "tab:red" if n == best else "tab:blue" if t.status == "ok" else "lightgrey"
            for n, t in zip(numbers, trials, strict=False)
        ]
        ax.bar(range(len(trials)), heights, color=colors)
        ax.set_xticks(range(len(trials)), [str(n) for n in numbers], fontsize=8)
        ax.set_xlabel("trial (red: best; grey: diverged)")
        ax.plot([], [], color="tab:red", linewidth=6, label=f"best: trial {best}")
    ax.set_ylabel("best val accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(f"sweep: {len(trials)} trials over {', '.join(keys)}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def save_lr_plot(
    lrs: list[float], losses: list[float], smoothed: list[float], suggestions: dict[str, tuple], chosen: str, path: Path
) -> Path:
    """Smoothed training loss against learning rate (log axis), the raw loss faint, the suggestions marked."""
    fig, ax = _subplots(figsize=(7, 4.5))
    ax.plot(lrs, losses, color="lightgrey", linewidth=1, label="loss per batch")
    ax.plot(lrs, smoothed, color="tab:blue", label="smoothed loss")
    markers = {"valley": ("o", "tab:red"), "steepest": ("s", "tab:green")}
    for name, (lr, loss) in suggestions.items():
        marker, color = markers.get(name, ("^", "tab:purple"))
        label = f"{name}: {lr:.2e}" + (" (suggested)" if name == chosen else "")
        ax.plot(
            [lr],
            [loss],
            marker=marker,
            markersize=10 if name == chosen else 7,
            color=color,
            linestyle="none",
            label=label,
        )
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    top = max(smoothed[: max(len(smoothed) - 5, 1)])
    bottom = min(min(smoothed), min(losses))
    ax.set_ylim(bottom - 0.05 * (top - bottom + 1e-9), top + 0.25 * (top - bottom + 1e-9))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


CONFUSION_DRAWN = 30  # classes a confusion PNG shows; beyond that the most confused ones, the rest in the CSV


def save_confusion(
    confusion: torch.Tensor, class_names: list[str], path: Path, title: str = "", normalize: bool = False
) -> Path:
    """The confusion matrix as a heat map, rows true classes; counts, or with ``normalize`` each row as
    fractions of that class's images (the diagonal is then each class's recall).

    With more than CONFUSION_DRAWN classes a readable picture cannot hold them all (1,000 classes would be a
    60,000-pixel canvas): it shows the classes most involved in mistakes, and the whole matrix is written
    beside it as ``<path>.csv``."""
    n = len(class_names)
    counts = confusion[:n, :n].double()
    full = counts / counts.sum(dim=1, keepdim=True).clamp(min=1) if normalize else counts
    shown = list(range(n))
    if n > CONFUSION_DRAWN:
        save_confusion_csv(full if normalize else confusion[:n, :n], class_names, path.with_suffix(".csv"))
        off = counts.clone().fill_diagonal_(0)
        shown = sorted((off.sum(dim=0) + off.sum(dim=1)).argsort(descending=True)[:CONFUSION_DRAWN].tolist())
        title = (
            f"{title}\n{len(shown)} of {n} classes, the most confused; all of them in {path.with_suffix('.csv').name}"
        )
    matrix = full[shown][:, shown].numpy()
    size = max(4, 0.6 * len(shown) + 2)
    fig, ax = _subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    names = [class_names[i] for i in shown]
    if any(len(name) > TICK_CHARS for name in names) or len(shown) < n:  # cut or picked names: number them too
        names = [f"{i} {shorten(class_names[i], TICK_CHARS)}" for i in shown]
    ax.set_xticks(range(len(shown)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(shown)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (rows sum to 1)" if normalize else "true")
    if title:
        ax.set_title(fit_title(title, int(12 * size)), fontsize=10)
    top = 1 if normalize else matrix.max() if matrix.size else 0
    for i in range(len(shown)):
        for j in range(len(shown)):
            value = matrix[i, j]
            ax.text(
                j,
                i,
                f"{value:.2f}" if normalize else str(int(value)),
                ha="center",
                va="center",
                color="white" if value > top / 2 else "black",
                fontsize=8,
            )
    fig.tight_layout()
    return _save(fig, path)


def save_confusion_csv(confusion: torch.Tensor, class_names: list[str], path: Path) -> Path:
    """The whole confusion matrix as CSV: a header of predicted classes, one row per true class."""
    return save_csv(
        path,
        ["true \\ predicted", *class_names],
        (
            [name, *(f"{v:.4f}" if isinstance(v, float) else v for v in row)]
            for name, row in zip(class_names, confusion.tolist(), strict=False)
        ),
    )


def _near_duplicate_lines(report: DataReport, rel) -> list[str]:
    if report.near_threshold is None:
        return []
    at = f"cosine >= {report.near_threshold:g}"
    if not (report.near_cross or report.near_within):
        return [f"Near-duplicates ({at}): none among {report.near_checked} readable images"]
    lines = []
    for title, groups in (
        (f"Near-duplicates across splits ({at}; test leakage)", report.near_cross),
        (f"Near-duplicates within a split ({at})", report.near_within),
    ):
        if groups:
            lines.append(f"{title}: {len(groups)} group(s)")
            lines += [f"  {_members(g.members, rel)}  (similarity {g.similarity:.3f})" for g in groups]
    return lines


def _members(members: list[tuple[str, str]], rel, shown: int = 8) -> str:
    """'a ~ b ~ c', or the first ``shown`` and how many more: a chain of look-alikes can hold thousands."""
    text = " ~ ".join(rel(p) for _, p in members[:shown])
    return text + (f" ~ ... ({len(members) - shown} more)" if len(members) > shown else "")


def format_report(report: DataReport) -> str:
    splits = report.splits
    rel = lambda p: os.path.relpath(p, splits.root)  # noqa: E731
    n = len(splits.class_names)
    lines = [f"{splits.root} ({splits.layout} layout): {n} class{'' if n == 1 else 'es'}"]
    width = max([5, *(display_width(n) for n in splits.class_names)])  # an emoji takes two columns
    lines.append(f"{'split':<6} {'class':<{width}} {'usable':>7} {'bad':>5}")
    for split, per_class in report.counts.items():
        for name, (ok, bad) in per_class.items():
            lines.append(f"{split:<6} {pad(name, width)} {ok:>7} {bad:>5}")
    good = [v for v in report.verdicts.values() if v.ok]
    if good:
        widths, heights = [v.width for v in good], [v.height for v in good]
        lines.append(
            f"Image sizes: width {min(widths)}-{max(widths)} (median {statistics.median(widths):g}), "
            f"height {min(heights)}-{max(heights)} (median {statistics.median(heights):g}), {len(good)} images"
        )
    split = "train" if "train" in report.counts else "test"
    counts = {name: ok for name, (ok, _) in report.counts.get(split, {}).items()}
    if len(counts) > 1:
        big, small = max(counts, key=counts.__getitem__), min(counts, key=counts.__getitem__)
        if counts[big] == counts[small]:
            lines.append(f"Class balance ({split}): balanced, {counts[big]} images per class")
        else:
            lines.append(
                f"Class balance ({split}): largest {big} {counts[big]}, smallest {small} {counts[small]}, "
                f"ratio {report.imbalance:.1f}x"
            )
    if report.bad:
        reasons = Counter(v.reason for _, v in report.bad)
        lines.append(f"Unreadable files ({', '.join(f'{n} {r}' for r, n in reasons.most_common())}):")
        lines += [f"  {rel(p)}\t{v.reason}\t{v.detail}" for p, v in report.bad]
    for title, groups in (
        ("Duplicates across splits (test leakage)", report.cross_duplicates),
        ("Duplicates within a split", report.within_duplicates),
    ):
        if groups:
            lines.append(f"{title}: {len(groups)} group(s)")
            lines += ["  " + " == ".join(rel(p) for _, p in group) for group in groups]
    lines += _near_duplicate_lines(report, rel)
    problems = report.problems
    lines.append("Found: " + "; ".join(problems) if problems else "No problems found.")
    return "\n".join(lines)
