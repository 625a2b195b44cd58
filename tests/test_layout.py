"""The package layout tells the data flow: each stage imports only from the stages below it, and no stage
borrows another's private names. Read from the source with ``ast``, so every import counts: those inside
functions (vggft imports torch and heavy modules lazily) as much as those at the top."""

from __future__ import annotations

import ast
from pathlib import Path

import vggft

PACKAGE = Path(vggft.__file__).parent
# Bottom to top: a module may import from its own stage and from the stages before it in this list.
STAGES = ["utils", "config", "data", "model", "features", "reporting", "training", "diagnostics", "tuning", "cli"]


def stage_of(module: str) -> str:
    """'vggft.model.build' -> 'model'; 'vggft.cli' -> 'cli'; 'vggft' (the version) -> 'utils', the bottom."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__init__":
        return "utils"
    return "cli" if parts[1] == "__main__" else parts[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(dotted: str) -> bool:
    """Whether ``dotted`` (vggft.x.y) is a module or package of the tree being checked."""
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def dotted_name(node: ast.expr) -> str | None:
    """'a.b.c' for the expression a.b.c, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted_name(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def uses(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, vggft module, names taken from it) for every way the file reaches vggft code: ``import``,
    ``from … import`` (a name that is itself a module counts as that module), relative imports,
    ``importlib.import_module``/``__import__`` of a literal name, and ``module._name`` on a name bound to a
    vggft module."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[int, str, list[str]]] = []
    bound: dict[str, str] = {}  # local name -> the vggft module it is
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "vggft":
                    found.append((node.lineno, alias.name, []))
                    bound[alias.asname] = alias.name if alias.asname else None
                    bound.setdefault("vggft", "vggft")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if base.split(".")[0] != "vggft":
                continue
            names = []
            for alias in node.names:
                if is_module(f"{base}.{alias.name}"):
                    found.append((node.lineno, f"{base}.{alias.name}", []))
                    bound[alias.asname or alias.name] = f"{base}.{alias.name}"
                else:
                    names.append(alias.name)
            if names:
                found.append((node.lineno, base, names))
        elif isinstance(node, ast.Call) and dotted_name(node.func) in (
            "importlib.import_module",
            "import_module",
            "__import__",
        ):
            first = node.args[0] if node.args else None
            if isinstance(first, ast.Constant) and str(first.value).split(".")[0] == "vggft":
                found.append((node.lineno, str(first.value), []))
    bound.pop(None, None)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = dotted_name(node.value)
            root, _, rest = (owner or "").partition(".")
            if root in bound and bound[root]:
                module = ".".join(filter(None, [bound[root], rest]))
                found.append((node.lineno, module, [node.attr]))
    return found


def violations() -> tuple[list[str], list[str]]:
    upward, private = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = stage_of(module_name(path))
        for line, module, names in uses(path):
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
    return sorted(set(upward)), sorted(set(private))


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
    """Every way of reaching a higher stage or another stage's private name is caught (the checks above can
    fail): a lazy import, a package imported by name, a relative import, importlib, a private attribute."""
    fake = tmp_path / "vggft"
    for stage in ("utils", "training"):
        (fake / stage).mkdir(parents=True)
        (fake / stage / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "training" / "loop.py").write_text("def _private():\n    pass\n")
    planted = {
        "utils/lazy.py": "def helper():\n    from vggft.training.loop import _private\n",
        "utils/by_name.py": "from vggft import training\n",
        "utils/relative.py": "from .. import training\n",
        "utils/dynamic.py": "import importlib\n\nloop = importlib.import_module('vggft.training.loop')\n",
        "training/peek.py": "import vggft.utils.by_name as other\nfrom vggft.utils import lazy\n\n"
        "other._hidden()\nlazy._secret\n",
    }
    for name, text in planted.items():
        (fake / name).write_text(text)
    monkeypatch.setattr(f"{__name__}.PACKAGE", fake)
    upward, private = violations()
    assert upward == [
        "vggft/utils/by_name.py:1: utils imports vggft.training (training is above it)",
        "vggft/utils/dynamic.py:3: utils imports vggft.training.loop (training is above it)",
        "vggft/utils/lazy.py:2: utils imports vggft.training.loop (training is above it)",
        "vggft/utils/relative.py:1: utils imports vggft.training (training is above it)",
    ]
    assert private == [
        "vggft/training/peek.py:4: _hidden from vggft.utils.by_name",
        "vggft/training/peek.py:5: _secret from vggft.utils.lazy",
        "vggft/utils/lazy.py:2: _private from vggft.training.loop",
    ]
