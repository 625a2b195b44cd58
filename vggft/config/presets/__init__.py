"""The shipped recipes: ``--config pet``, ``keras_gap``, ``demo``.

The YAML files beside this module travel inside the package, so ``--config pet`` works from any folder;
``configs/`` in the source tree holds the same files for users to copy and edit (a test keeps them equal).
Like the schema, this module imports no torch: ``vggft configs`` answers in milliseconds.
"""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).resolve().parent


def names() -> list[str]:
    """The preset names, sorted: the stems of the YAML files here."""
    return sorted(path.stem for path in FOLDER.glob("*.yaml"))


def find(name: str) -> Path | None:
    """The file of preset ``name`` ('pet' or 'pet.yaml'), or None when there is no such preset."""
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    return FOLDER / f"{stem}.yaml" if stem in names() else None


def description(name: str) -> str:
    """The preset's first comment line: what recipe it is."""
    for line in (FOLDER / f"{name}.yaml").read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""
