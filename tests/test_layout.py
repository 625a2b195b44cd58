"""The package layout tells the data flow: each stage imports only from the stages below it, and no stage
borrows another's private names. Read from the source with ``ast``, so every import counts: those inside
functions (vggft imports torch and heavy modules lazily) as much as those at the top."""

from __future__ import annotations

import ast
from pathlib import Path

import vggft

PACKAGE = Path(vggft.__file__).parent
# Bottom to top: a module may import from its own stage and from the stages before it in this list.
STAGES = ["utils", "config", "data", "reporting", "model", "features", "training", "diagnostics", "tuning", "cli"]


def stage_of(module: str) -> str:
    """'vggft.model.build' -> 'model'; 'vggft.cli' -> 'cli'; 'vggft' (the version) -> 'utils', the bottom."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__init__":
        return "utils"
    return "cli" if parts[1] == "__main__" else parts[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported vggft module, names taken from it) for every vggft import in the file."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names if alias.name.split(".")[0] == "vggft"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if base.split(".")[0] == "vggft":
                found.append((node.lineno, base, [alias.name for alias in node.names]))
    return found


def violations() -> tuple[list[str], list[str]]:
    upward, private = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = stage_of(module_name(path))
        for line, module, names in imports(path):
            where = f"{path.relative_to(PACKAGE.parent)}:{line}"
            imported = stage_of(module)
            if STAGES.index(imported) > STAGES.index(importer):
                upward.append(f"{where}: {importer} imports {module} ({imported} is above it)")
            if imported != importer:
                private += [
                    f"{where}: {name} from {module}"
                    for name in names
                    if name.startswith("_") and not name.startswith("__")
                ]
    return upward, private


def test_every_module_lives_in_a_known_stage():
    top = sorted(
        p.stem if p.is_file() else p.name
        for p in PACKAGE.iterdir()
        if p.name not in ("__init__.py", "__main__.py", "__pycache__") and (p.suffix == ".py" or p.is_dir())
    )
    assert top == sorted(STAGES)
    assert len(top) <= 12


def test_no_stage_imports_from_a_stage_above_it():
    upward, _ = violations()
    assert upward == []


def test_no_private_name_crosses_a_stage():
    _, private = violations()
    assert private == []


def test_the_checker_sees_what_it_must_refuse(tmp_path, monkeypatch):
    """A planted upward import and a borrowed private name are both caught (the checks above can fail)."""
    fake = tmp_path / "vggft"
    for stage in ("utils", "training"):
        (fake / stage).mkdir(parents=True)
        (fake / stage / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "utils" / "low.py").write_text("def helper():\n    from vggft.training.loop import _private\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", fake)
    upward, private = violations()
    assert upward == ["vggft/utils/low.py:2: utils imports vggft.training.loop (training is above it)"]
    assert private == ["vggft/utils/low.py:2: _private from vggft.training.loop"]
