"""Runs you can compare: ``results.json`` in each run folder, and ``vggft runs``, the table of them all.

Every command that makes a run folder (train, sweep, kfold, label-issues) writes ``results.json`` last, once
its work is done: what it found, how long it took, and (train, ``sweep --save-best``) which weights it saved,
by path and the SHA-256 their sidecar records. ``list_runs`` reads each folder under ``output.runs_dir``: its
``results.json`` and ``config.yaml``, checked; a folder without ``results.json`` is a run still going, killed,
or made before vggft wrote one ("unfinished", its kind told by the files it holds); a folder whose files are
not vggft's, or are damaged, is set aside with the reason, and the others are listed. Imports no torch.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from vggft.utils.errors import ConfigError

RESULTS_FILE = "results.json"
RESULTS_FORMAT = "vggft-results/1"
KINDS = ("train", "sweep", "kfold", "label_issues", "lr_find")
# A run folder without results.json: its kind by the first of these files it holds.
MARKERS = {
    "results.csv": "sweep",
    "folds.csv": "kfold",
    "label_issues.csv": "label_issues",
    "lr_find.csv": "lr_find",
    "metrics.csv": "train",
}
FIRST = ("name", "date", "kind", "status", "arch", "head")  # then the settings that differ between the runs
FIGURES = ("val_acc", "test_acc", "seconds")
SUMMARY = ("trials", "best_trial", "folds", "cv_acc", "cv_std", "suspects")  # shown when a listed run has them
PERCENT = ("val_acc", "test_acc", "cv_acc", "cv_std")
NOT_COMPARED = ("model.arch", "model.head")  # columns of their own; output.* names files, not settings
CELL = 28  # a table cell longer than this is cut in its middle


def save_results(folder: Path, kind: str, seconds: float, cfg, **fields: Any) -> Path:
    """``folder/results.json``, written whole: the run's ``kind``, vggft's version, when it finished, its
    wall time in ``seconds``, the arch and head of ``cfg``, then ``fields``."""
    from vggft import __version__
    from vggft.utils.files import save_json

    body = {
        "format": RESULTS_FORMAT,
        "kind": kind,
        "vggft_version": __version__,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(seconds, 3),
        "arch": cfg.model.arch,
        "head": cfg.model.head,
        **fields,
    }
    path = Path(folder) / RESULTS_FILE
    save_json(body, path)
    return path


def weights_record(weights: Path, sidecar: Path) -> dict:
    """The saved weights for results.json: their absolute path and the SHA-256 their sidecar records (taken
    as they were written; hundreds of megabytes are not read again)."""
    try:
        digest = json.loads(Path(sidecar).read_text(encoding="utf-8")).get("weights_sha256")
    except (OSError, ValueError, AttributeError):
        digest = None
    return {"path": str(Path(weights).resolve()), "sha256": digest}


class BrokenRun(Exception):
    """A folder that cannot be listed; the message says why."""


@dataclass
class RunRow:
    name: str
    path: Path
    kind: str
    status: str  # done, or unfinished (no results.json)
    date: str  # local time, YYYY-MM-DD HH:MM:SS: when it finished (or last wrote, if unfinished)
    figures: dict[str, Any]  # arch, head, val_acc, test_acc, seconds and the kind's summary columns
    settings: dict[str, Any] | None  # config.yaml flattened to dotted keys (None: no config.yaml)
    results: dict | None

    def value(self, column: str) -> Any:
        if column in ("name", "date", "kind", "status"):
            return getattr(self, column)
        if column in self.figures:
            return self.figures[column]
        return (self.settings or {}).get(column)

    def to_dict(self) -> dict:
        head = {"name": self.name, "path": str(self.path), "date": self.date, "kind": self.kind}
        return {**head, "status": self.status, **self.figures, "settings": self.settings, "results": self.results}


@dataclass
class Broken:
    name: str
    path: Path
    reason: str


@dataclass
class RunList:
    runs_dir: Path
    rows: list[RunRow]
    broken: list[Broken] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)  # the table's, in order

    def to_dict(self) -> dict:
        return {
            "runs_dir": str(self.runs_dir),
            "columns": self.columns,
            "runs": [row.to_dict() for row in self.rows],
            "broken": [{"name": b.name, "path": str(b.path), "reason": b.reason} for b in self.broken],
        }


def list_runs(runs_dir: str | Path, *, kind: str | None = None, sort: str | None = None) -> RunList:
    """Every run folder under ``runs_dir`` (those of ``kind`` alone, if given), sorted by ``sort`` (a column;
    ``-column``: descending; default: date), and the folders set aside as broken or foreign."""
    runs_dir = Path(runs_dir)
    if kind is not None and kind.replace("-", "_") not in KINDS:
        raise ConfigError(f"--kind: expected one of {', '.join(KINDS)}, got '{kind}'")
    if not runs_dir.is_dir():
        raise ConfigError(
            f"output.runs_dir: '{runs_dir}' is not a folder (no run has been made there); "
            "point --set output.runs_dir=PATH at the folder your runs are in"
        )
    listing = RunList(runs_dir, [])
    for folder in sorted(p for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            row = read_run(folder)
        except BrokenRun as err:
            listing.broken.append(Broken(folder.name, folder, str(err)))
            continue
        if kind is None or row.kind == kind.replace("-", "_"):
            listing.rows.append(row)
    listing.columns = table_columns(listing.rows)
    sort_rows(listing, sort or "date")
    return listing


def read_run(folder: Path) -> RunRow:
    """One run folder as a row of the table (BrokenRun: why it cannot be one)."""
    config_path, results_path = folder / "config.yaml", folder / RESULTS_FILE
    settings = read_settings(config_path) if config_path.is_file() else None
    results = read_results(results_path) if results_path.is_file() else None
    if results is None and settings is None:
        raise BrokenRun(f"not a vggft run (no {RESULTS_FILE} or config.yaml)")
    if results is not None:
        kind, status = results["kind"], "done"
        figures = _figures(results)
        date = _local(results["finished"])  # figures first: they check the best trial's values
        if kind == "sweep" and settings is not None:  # the swept keys as the best trial had them (its best.yaml)
            settings.update(_part(results, "best", "values") or {})
    else:
        kind = next((k for name, k in MARKERS.items() if (folder / name).is_file()), "train")
        status = "done" if kind == "lr_find" else "unfinished"  # lr-find writes no results.json
        figures = _unfinished_figures(folder, kind)
        date = _last_written(folder)
    for key in ("arch", "head"):
        figures[key] = figures.get(key) or (settings or {}).get(f"model.{key}")
    figures = {**dict.fromkeys(FIGURES), **figures}  # every run has these, None where it has no such figure
    return RunRow(folder.name, folder, kind, status, date, figures, settings, results)


def read_settings(path: Path) -> dict[str, Any]:
    """config.yaml flattened to dotted keys, checked to be a vggft config."""
    try:
        body = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise BrokenRun(f"config.yaml unreadable ({' '.join(str(err).split())[:120]})") from None
    if not isinstance(body, dict) or not all(isinstance(v, dict) for v in body.values()):
        raise BrokenRun("config.yaml is not a vggft config (not sections of keys)")
    settings = flatten(body)
    if not isinstance(settings.get("model.arch"), str):
        raise BrokenRun("config.yaml is not a vggft config (no model.arch)")
    return settings


def flatten(body: Mapping, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in body.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_results(path: Path) -> dict:
    """results.json, checked: vggft's format, a known kind, a finish time and its seconds."""
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise BrokenRun(f"{RESULTS_FILE} unreadable ({err})") from None
    if not isinstance(body, dict) or not str(body.get("format", "")).startswith("vggft-results/"):
        raise BrokenRun(f"{RESULTS_FILE} is not a vggft results file (no format '{RESULTS_FORMAT}')")
    if body["format"] != RESULTS_FORMAT:
        raise BrokenRun(f"{RESULTS_FILE} is of format '{body['format']}', newer than this vggft reads; upgrade vggft")
    if body.get("kind") not in KINDS:
        raise BrokenRun(f"{RESULTS_FILE}: unknown kind {body.get('kind')!r}")
    _local(body.get("finished"))
    _number(body, "seconds")
    return body


def _figures(results: dict) -> dict[str, Any]:
    """The table's figures of a finished run, each checked to be a number where one is expected."""
    kind = results["kind"]
    figures: dict[str, Any] = {"arch": _text(results, "arch"), "head": _text(results, "head")}
    figures["seconds"] = _number(results, "seconds")
    if kind == "train":
        figures["val_acc"] = _number(results, "best_val", "accuracy")
        figures["test_acc"] = _number(results, "test", "accuracy")
    elif kind == "sweep":
        figures["val_acc"] = _number(results, "best", "val_acc")
        figures["trials"] = _number(results, "trials")
        trial, values = _number(results, "best", "trial"), _part(results, "best", "values") or {}
        if not isinstance(values, dict):
            raise BrokenRun(f"{RESULTS_FILE}: 'best.values' is {values!r}, not the swept keys' values")
        shown = ", ".join(f"{k}={_cell(v)}" for k, v in values.items())
        figures["best_trial"] = None if trial is None else f"{trial}: {shown}" if shown else str(trial)
    else:
        for key in ("folds", "cv_acc", "cv_std", "suspects"):
            if key in results:
                figures[key] = _number(results, key)
    return figures


def _unfinished_figures(folder: Path, kind: str) -> dict[str, Any]:
    """What a run without results.json shows: a train run's best val accuracy so far, from metrics.csv."""
    if kind != "train":
        return {}
    try:
        with open(folder / "metrics.csv", newline="", encoding="utf-8") as handle:
            accs = [float(row["val_acc"]) for row in csv.DictReader(handle) if row.get("val_acc")]
    except (OSError, ValueError, KeyError, csv.Error):
        return {}
    return {"val_acc": max(accs)} if accs else {}


def _part(body: dict, *path: str) -> Any:
    """``body[path[0]][path[1]]...``; None where a section is null (a run with no val split, no test split)."""
    value: Any = body
    for key in path:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise BrokenRun(f"{RESULTS_FILE}: '{'.'.join(path)}' is not where vggft writes it")
        value = value.get(key)
    return value


def _number(body: dict, *path: str) -> float | int | None:
    value = _part(body, *path)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise BrokenRun(f"{RESULTS_FILE}: '{'.'.join(path)}' is {value!r}, not a number")
    return value


def _text(body: dict, key: str) -> str | None:
    value = body.get(key)
    return value if isinstance(value, str) else None


def _local(stamp: Any) -> str:
    try:
        return datetime.strptime(str(stamp), "%Y-%m-%dT%H:%M:%S%z").astimezone().strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        raise BrokenRun(f"{RESULTS_FILE}: 'finished' is {stamp!r}, not a time vggft writes") from None


def _last_written(folder: Path) -> str:
    times = [p.stat().st_mtime for p in folder.iterdir() if p.is_file()] or [folder.stat().st_mtime]
    return datetime.fromtimestamp(max(times)).strftime("%Y-%m-%d %H:%M:%S")


# --- the table --------------------------------------------------------------------------------------


def table_columns(rows: list[RunRow]) -> list[str]:
    """name, date, kind, status, arch, head, the settings whose values differ between the runs, val and test
    acc@1, seconds, then the summary columns of the kinds listed."""
    compared = [row.settings for row in rows if row.settings is not None]
    keys = sorted({key for settings in compared for key in settings})
    differing = [
        key
        for key in keys
        if not key.startswith("output.")
        and key not in NOT_COMPARED
        and len({json.dumps(s.get(key), sort_keys=True, default=str) for s in compared}) > 1
    ]
    summary = [column for column in SUMMARY if any(column in row.figures for row in rows)]
    return [*FIRST, *differing, *FIGURES, *summary]


def sort_rows(listing: RunList, sort: str) -> None:
    """In place by ``sort`` (``-column``: descending), then by date and name; a run without a value last."""
    column, descending = sort.removeprefix("-"), sort.startswith("-")
    if column not in listing.columns:
        raise ConfigError(f"--sort: no column '{column}'; the columns are {', '.join(listing.columns)}")
    listing.rows.sort(key=lambda row: (row.date, row.name))
    present = [row for row in listing.rows if not _blank(row.value(column))]
    absent = [row for row in listing.rows if _blank(row.value(column))]
    present.sort(key=lambda row: _order(row.value(column)), reverse=descending)
    listing.rows[:] = present + absent


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _order(value: Any) -> tuple:
    """Numbers by value, before anything else by its text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value, "")
    return (1, 0, _cell(value))


def table(listing: RunList) -> tuple[list[str], list[list[str]]]:
    """The header and rows of text that ``vggft runs`` prints: percentages, seconds, long values cut."""
    return listing.columns, [[_shown(column, row.value(column)) for column in listing.columns] for row in listing.rows]


def _shown(column: str, value: Any) -> str:
    if _blank(value):
        return "-"
    if column in PERCENT:
        return f"{100 * value:.2f}%"
    if column == "seconds":
        return f"{value:.1f}"
    return _cut(_cell(value))


def _cell(value: Any) -> str:
    """A setting as YAML would read it back: 0.001, true, null, [1, 2]."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, default=str)
    return str(value)


def _cut(text: str, limit: int = CELL) -> str:
    if len(text) <= limit:
        return text
    keep = limit - 3
    return text[: keep // 2] + "..." + text[len(text) - (keep - keep // 2) :]
