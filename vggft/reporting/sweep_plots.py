"""The pictures of sweep and lr-find: val accuracy per trial, loss against learning rate."""

from __future__ import annotations

from pathlib import Path

from vggft.reporting.plots import _save, _subplots


def save_sweep_plot(trials: list, keys: list[str], best: int, path: Path) -> Path:
    """Val accuracy of each trial: against the value when one numeric key is swept, else a bar per trial."""
    fig, ax = _subplots(figsize=(max(6.0, 0.35 * len(trials) + 3), 4.2))
    ok = [t for t in trials if t.status == "ok"]
    numeric = len(keys) == 1 and all(isinstance(t.values[keys[0]], (int, float)) and not isinstance(
        t.values[keys[0]], bool) for t in trials)
    if numeric and len({t.values[keys[0]] for t in ok}) > 1:
        key = keys[0]
        points = sorted((t.values[key], t.val_acc, t.number) for t in ok)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        positive = [p[0] for p in points if p[0] > 0]
        if len(positive) == len(points) and max(positive) / min(positive) >= 100:
            ax.set_xscale("log")
        winner = next(p for p in points if p[2] == best)
        ax.plot([winner[0]], [winner[1]], marker="*", markersize=16, color="tab:red", linestyle="none",
                label=f"best: trial {best}, {key}={winner[0]:g}")
        ax.set_xlabel(key)
    else:
        numbers = [t.number for t in trials]
        heights = [t.val_acc if t.status == "ok" else 0.0 for t in trials]
        colors = ["tab:red" if n == best else "tab:blue" if t.status == "ok" else "lightgrey"
                  for n, t in zip(numbers, trials)]
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


def save_lr_plot(lrs: list[float], losses: list[float], smoothed: list[float], suggestions: dict[str, tuple],
                 chosen: str, path: Path) -> Path:
    """Smoothed training loss against learning rate (log axis), the raw loss faint, the suggestions marked."""
    fig, ax = _subplots(figsize=(7, 4.5))
    ax.plot(lrs, losses, color="lightgrey", linewidth=1, label="loss per batch")
    ax.plot(lrs, smoothed, color="tab:blue", label="smoothed loss")
    markers = {"valley": ("o", "tab:red"), "steepest": ("s", "tab:green")}
    for name, (lr, loss) in suggestions.items():
        marker, color = markers.get(name, ("^", "tab:purple"))
        label = f"{name}: {lr:.2e}" + (" (suggested)" if name == chosen else "")
        ax.plot([lr], [loss], marker=marker, markersize=10 if name == chosen else 7, color=color,
                linestyle="none", label=label)
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
