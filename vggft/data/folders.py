"""Finding the images: folder layouts, class lists, the stratified pool split and its manifest.

Layouts accepted under ``data.root``:

- ``train/``, ``test/`` and optionally ``val/`` (or ``valid/``, ``validation/``), each of class folders;
- a single pool of class folders, split by ``data.split`` with ``data.split_seed``, stratified per class.

Nothing here decodes an image; ``vggft.data.images`` does that.
"""

from __future__ import annotations

import os
import random
import stat
from dataclasses import dataclass, field
from pathlib import Path

from vggft.config.schema import DataConfig
from vggft.utils.errors import DataError
from vggft.utils.logs import log

# torchvision's ImageFolder extensions; anything else (Thumbs.db, notes, .DS_Store) is not an image.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def is_image_name(path: str | Path) -> bool:
    name = Path(path).name
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


SPLITS = ("train", "val", "test")
VAL_NAMES = ("val", "valid", "validation")
IGNORED_DIRS = ("__MACOSX",)

Sample = tuple[str, int]  # (path, class index)


@dataclass
class DataSplits:
    root: Path
    layout: str  # "folders" or "pool"
    class_names: list[str]
    splits: dict[str, list[Sample]] = field(default_factory=dict)

    def __getitem__(self, split: str) -> list[Sample]:
        return self.splits.get(split, [])

    def all_samples(self) -> list[tuple[str, Sample]]:
        return [(split, sample) for split in SPLITS for sample in self[split]]


Skipped = list[tuple[str, str]]  # (path, why) of what a folder walk left out


def display_name(name: str) -> str:
    """``name`` printable everywhere (JSON, CSV, plots, a UTF-8 terminal): a folder name's bytes that are not
    UTF-8 (Latin-1 ``caf\\xe9``) shown as ``\\xe9`` escapes. Paths keep the real bytes; this is for labels."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _identity(path: str | Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _ancestors(folder: str | Path) -> set[tuple[int, int]]:
    """The identities of ``folder`` and of every folder above it: a link back up to any of them is a loop."""
    real = Path(os.path.realpath(folder))
    return {ident for ident in map(_identity, (real, *real.parents)) if ident is not None}


def not_regular(mode: int) -> str:
    """What a file that is not a regular file is, in words, from its ``st_mode``."""
    kinds = (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a folder"),
    )
    return next((what for test, what in kinds if test(mode)), "a special file") + ", not a regular file"


LOOP = "leads back to a folder already walked (or above it)"


def _claim(path: str, seen: set, skipped: Skipped) -> bool:
    """Mark the real folder behind ``path`` walked; False (and noted in ``skipped``) if it already was: a second
    link to it, a link back up, or a bind mount of a folder into itself."""
    ident = _identity(path)
    if ident is None or ident in seen:
        skipped.append((path, LOOP if ident else "unreadable folder"))
        return False
    seen.add(ident)
    return True


def _visible_dirs(folder: Path, seen: set, skipped: Skipped) -> list[Path]:
    """The visible subfolders of ``folder`` not walked yet, sorted, claimed in ``seen`` (real folders before
    links, so that a class folder and a link to it keep the folder's own name)."""
    entries = [
        e for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".") and e.name not in IGNORED_DIRS
    ]
    entries.sort(key=lambda e: (e.is_symlink(), e.name))
    return sorted(Path(e.path) for e in entries if _claim(e.path, seen, skipped))


def images_in(folder: Path, seen: set | None = None, skipped: Skipped | None = None) -> list[str]:
    """Every image file below ``folder``, sorted, skipping hidden files and folders.

    Links are followed, but each real folder is walked once (``seen`` holds the identities already walked;
    a link to one of them or to a folder above is a loop), and only regular files are listed: a FIFO named
    p.jpg, a socket or a link to /dev/zero is skipped, never opened. What was left out goes to ``skipped``
    (one note is logged here when the caller passes none).
    """
    own = skipped is None
    skipped = [] if skipped is None else skipped
    seen = _ancestors(folder) if seen is None else seen
    found: list[str] = []
    stack: list[str] = [str(folder)]
    links: list[str] = []
    while stack or links:
        if not stack:  # links last: a folder reached both ways is listed under its real path
            link = links.pop(0)
            if _claim(link, seen, skipped):
                stack.append(link)
            continue
        try:
            entries = sorted(os.scandir(stack.pop()), key=lambda e: e.name)
        except OSError as err:
            skipped.append((err.filename, f"unreadable folder ({err.strerror or err})"))
            continue
        for entry in (e for e in entries if not e.name.startswith(".")):
            if entry.is_dir():
                if entry.name in IGNORED_DIRS:
                    continue
                if entry.is_symlink():
                    links.append(entry.path)
                elif _claim(entry.path, seen, skipped):
                    stack.append(entry.path)
            elif is_image_name(entry.name):
                _list_file(entry, found, skipped)
    if own:
        note_skipped(skipped, folder)
    return sorted(found)


def _list_file(entry: os.DirEntry, found: list[str], skipped: Skipped) -> None:
    try:
        mode = entry.stat().st_mode  # follows a link: /dev/zero behind z.jpg is a device
    except OSError:  # a dangling link: listed, and reported unreadable with the bad images
        mode = stat.S_IFREG
    if stat.S_ISREG(mode):
        found.append(entry.path)
    else:
        skipped.append((entry.path, not_regular(mode)))


def note_skipped(skipped: Skipped, where: str | Path) -> None:
    """One note for everything a walk left out: how many, and the first."""
    if skipped:
        path, why = skipped[0]
        log.warning(
            f"Left out {len(skipped)} path(s) under {where}: a folder is walked once and only regular "
            f"files are read (first: {path}: {why})"
        )


def _class_folders(split_dir: Path, skipped: Skipped) -> dict[str, list[str]]:
    seen = _ancestors(split_dir)
    folders = _visible_dirs(split_dir, seen, skipped)  # every class folder claimed before any is walked
    names = [display_name(folder.name) for folder in folders]
    if len(set(names)) < len(names):
        twice = next(name for name in names if names.count(name) > 1)
        raise DataError(f"{split_dir}: two class folders print as '{twice}'; rename one of them")
    return {name: images_in(folder, seen, skipped) for name, folder in zip(names, folders, strict=True)}


def _find_split_dir(root: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if (root / name).is_dir():
            return root / name
    return None


def find_splits(data: DataConfig, record: dict | None = None, source: str = "") -> DataSplits:
    """Discover the splits under ``data.root`` (a pool's split comes from ``record``, the split a model was
    trained with, when there is one) without decoding."""
    root = Path(data.root)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "not found"
        raise DataError(
            f"data.root: '{root}' {what}; set data.root (or --set data.root=PATH) to a folder "
            "holding train/ and test/ class folders, or one folder per class"
        )
    skipped: Skipped = []
    try:
        if (root / "train").is_dir() or (root / "test").is_dir():
            return _folder_layout(root, data, skipped)
        if record is not None and Path(record.get("root", "")) == root.resolve():
            return splits_from_record(record, root, source)
        return _pool_layout(root, data, skipped)
    finally:  # said before any error about what is left (an empty class folder whose one file was a FIFO)
        note_skipped(skipped, root)


def _folder_layout(root: Path, data: DataConfig, skipped: Skipped) -> DataSplits:
    """train/ and test/ (a root with test/ alone can still be evaluated); classes come from train/."""
    test_dir = _find_split_dir(root, ("test",))
    if test_dir is None:
        raise DataError(f"{root}: has train/ but no test/; add a test/ folder of class folders")
    found = {"test": _class_folders(test_dir, skipped)}
    if (root / "train").is_dir():
        found["train"] = _class_folders(root / "train", skipped)
    first = "train" if "train" in found else "test"
    class_names = list(found[first])
    if not class_names:
        raise DataError(f"{root / first}: no class folders; put each class's images in {first}/<class>/")
    index = {name: i for i, name in enumerate(class_names)}
    val_dir = _find_split_dir(root, VAL_NAMES)
    dirs = {"train": root / "train", "test": test_dir}
    if val_dir is not None:
        found["val"] = _class_folders(val_dir, skipped)
        dirs["val"] = val_dir
    anchor = dirs[first].name
    splits: dict[str, list[Sample]] = {}
    for split, classes in found.items():
        for name, files in classes.items():
            if name not in index:
                raise DataError(
                    f"{dirs[split] / name}: class '{name}' is not in {anchor}/ (classes: {', '.join(class_names)}); "
                    f"add {anchor}/{name} or remove {dirs[split].name}/{name}"
                )
            if not files:
                raise DataError(f"{dirs[split] / name}: empty class folder; add images or remove the folder")
        splits[split] = [(path, index[name]) for name, files in classes.items() for path in files]
    result = DataSplits(root, "folders", class_names, splits)
    if "val" not in splits and "train" in splits and data.val_fraction > 0:
        result.splits["train"], result.splits["val"] = _stratified_take(
            result["train"], data.val_fraction, f"{data.split_seed}/val"
        )
    return result


def _pool_layout(root: Path, data: DataConfig, skipped: Skipped) -> DataSplits:
    classes = _class_folders(root, skipped)
    if not classes:
        raise DataError(
            f"{root}: no class folders; expected train/ and test/ of class folders, or one folder per class"
        )
    for name, files in classes.items():
        if not files:
            raise DataError(f"{root / name}: empty class folder; add images or remove the folder")
    class_names = list(classes)
    _, val_fraction, test_fraction = data.split
    splits: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    for label, (name, files) in enumerate(classes.items()):
        order = list(files)
        random.Random(f"{data.split_seed}/{name}").shuffle(order)
        n_test = round(len(order) * test_fraction)
        n_val = round(len(order) * val_fraction)
        n_val = min(n_val, max(len(order) - n_test - 1, 0))
        splits["test"] += [(p, label) for p in sorted(order[:n_test])]
        splits["val"] += [(p, label) for p in sorted(order[n_test : n_test + n_val])]
        splits["train"] += [(p, label) for p in sorted(order[n_test + n_val :])]
    if not splits["val"] and val_fraction == 0 and data.val_fraction > 0:
        splits["train"], splits["val"] = _stratified_take(splits["train"], data.val_fraction, f"{data.split_seed}/val")
    return DataSplits(root, "pool", class_names, splits)


# Folder names that hold splits, not classes: as class names they mean data.root is one level off.
SPLIT_LIKE = frozenset({"train", "training", "test", "testing", "eval", "evaluation", *VAL_NAMES})


def unlearnable(splits: DataSplits) -> str | None:
    """Why ``splits`` cannot train a classifier (fewer than two classes, or split folders taken for classes),
    as one line naming the folder and the fix; None when there is nothing to say."""
    where = splits.root if splits.layout == "pool" else splits.root / ("train" if splits["train"] else "test")
    names = splits.class_names
    split_like = [name for name in names if name.lower() in SPLIT_LIKE]
    if split_like:
        return (
            f"{where}: the class folders {', '.join(split_like)} are named like splits, not classes; vggft looks "
            "for train/ and test/ (lowercase) holding one folder per class: rename them, or set data.root to "
            "the folder that holds the class folders"
        )
    if len(names) >= 2:
        return None
    inner = splits.root / names[0]
    if splits.layout == "pool" and _has_folders(inner):
        return (
            f"{where}: one class folder, '{names[0]}', with folders inside it; data.root looks one level too "
            f"high: set data.root to {inner}"
        )
    return (
        f"{where}: only one class, '{names[0]}'; a classifier learns nothing from one class (every answer is "
        "right): add a folder per class, at least two"
    )


def _has_folders(folder: Path) -> bool:
    try:
        return any(entry.is_dir() for entry in folder.iterdir())
    except OSError:
        return False


def check_learnable(splits: DataSplits) -> None:
    """Refuse data that cannot train a classifier (see ``unlearnable``), exit 3."""
    reason = unlearnable(splits)
    if reason is not None:
        raise DataError(reason)


def _stratified_take(samples: list[Sample], fraction: float, seed: str) -> tuple[list[Sample], list[Sample]]:
    """Move ``fraction`` of each class (at least one where a class has two or more) out of ``samples``."""
    by_class: dict[int, list[Sample]] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    kept, taken = [], []
    for label, group in sorted(by_class.items()):
        order = list(group)
        random.Random(f"{seed}/{label}").shuffle(order)
        n = min(max(round(len(order) * fraction), 1 if len(order) > 1 else 0), len(order) - 1)
        taken += order[:n]
        kept += order[n:]
    return sorted(kept), sorted(taken)


def split_record(splits: DataSplits, data: DataConfig) -> dict:
    """Which file went to which split of a pool, stored with the run's checkpoints and the weights' sidecar,
    so that resume and eval later use exactly the same held-out files."""
    body = {
        "root": str(splits.root.resolve()),
        "split": data.split,
        "split_seed": data.split_seed,
        "class_names": splits.class_names,
    }
    for split in SPLITS:
        body[split] = [Path(os.path.relpath(p, splits.root)).as_posix() for p, _ in splits[split]]
        body[f"{split}_labels"] = [label for _, label in splits[split]]
    return body


def splits_from_record(record: dict, root: Path, source: str) -> DataSplits:
    """The pool split ``record`` (from ``source``: a checkpoint or sidecar) over the files under ``root``."""
    try:
        class_names = list(record["class_names"])
        splits = {
            split: [
                (str(root / rel), int(label))
                for rel, label in zip(record[split], record[f"{split}_labels"], strict=True)
            ]
            for split in SPLITS
        }
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(
            f"{source}: unreadable pool split record ({err}); train again to split the pool afresh"
        ) from None
    missing = [p for split in SPLITS for p, _ in splits[split] if not os.path.exists(p)]
    if missing:
        raise DataError(
            f"{source}: {len(missing)} file(s) of the pool split it was trained with are gone from {root} "
            f"(first: {missing[0]}); restore them, or train again to split afresh"
        )
    return DataSplits(root, "pool", class_names, splits)


def output_names(class_names: list[str], num_outputs: int) -> list[str]:
    """One name per model output: the classes, then ``unused_K`` for outputs beyond them
    (``model.num_classes`` larger than the class folders), so every prediction has a name."""
    return list(class_names) + [f"unused_{i}" for i in range(len(class_names), num_outputs)]
