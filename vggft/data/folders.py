"""Finding the images: folder layouts, class lists, the stratified pool split and its manifest.

Layouts accepted under ``data.root``:

- ``train/``, ``test/`` and optionally ``val/`` (or ``valid/``, ``validation/``), each of class folders;
- a single pool of class folders, split by ``data.split`` with ``data.split_seed``, stratified per class.

Nothing here decodes an image; ``vggft.data.images`` does that.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..config import DataConfig
from ..errors import DataError

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


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(
        entry
        for entry in folder.iterdir()
        if entry.is_dir() and not entry.name.startswith(".") and entry.name not in IGNORED_DIRS
    )


def images_in(folder: Path) -> list[str]:
    """Every image file below ``folder``, sorted, skipping hidden files and folders."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in IGNORED_DIRS)
        found.extend(os.path.join(dirpath, name) for name in filenames if is_image_name(name))
    return sorted(found)


def _class_folders(split_dir: Path) -> dict[str, list[str]]:
    return {folder.name: images_in(folder) for folder in _visible_dirs(split_dir)}


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
    if (root / "train").is_dir() or (root / "test").is_dir():
        return _folder_layout(root, data)
    if record is not None and Path(record.get("root", "")) == root.resolve():
        return splits_from_record(record, root, source)
    return _pool_layout(root, data)


def _folder_layout(root: Path, data: DataConfig) -> DataSplits:
    """train/ and test/ (a root with test/ alone can still be evaluated); classes come from train/."""
    test_dir = _find_split_dir(root, ("test",))
    if test_dir is None:
        raise DataError(f"{root}: has train/ but no test/; add a test/ folder of class folders")
    found = {"test": _class_folders(test_dir)}
    if (root / "train").is_dir():
        found["train"] = _class_folders(root / "train")
    first = "train" if "train" in found else "test"
    class_names = list(found[first])
    if not class_names:
        raise DataError(f"{root / first}: no class folders; put each class's images in {first}/<class>/")
    index = {name: i for i, name in enumerate(class_names)}
    val_dir = _find_split_dir(root, VAL_NAMES)
    if val_dir is not None:
        found["val"] = _class_folders(val_dir)
    dirs = {"train": root / "train", "test": test_dir, "val": val_dir}
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


def _pool_layout(root: Path, data: DataConfig) -> DataSplits:
    classes = _class_folders(root)
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
            split: [(str(root / rel), int(label)) for rel, label in zip(record[split], record[f"{split}_labels"])]
            for split in SPLITS
        }
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{source}: unreadable pool split record ({err}); train again to split the pool afresh") from None
    missing = [p for split in SPLITS for p, _ in splits[split] if not os.path.exists(p)]
    if missing:
        raise DataError(
            f"{source}: {len(missing)} file(s) of the pool split it was trained with are gone from {root} "
            f"(first: {missing[0]}); restore them, or train again to split afresh"
        )
    return DataSplits(root, "pool", class_names, splits)
