"""The documentation: README stays short, docs/configuration.md is the generated reference, every link
resolves, every exit code has its section in docs/errors.md, and the modules the docs name exist.

Fast: reads files and imports only torch-free modules (the config reference and the error classes).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from vggft.config import reference
from vggft.utils import errors

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_LIMIT = 16 * 1024
REGENERATE = (
    "python -c \"from vggft.config import reference; print(reference.markdown(), end='')\" > docs/configuration.md"
)

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.MULTILINE)


def pages() -> list[Path]:
    return [README, ROOT / "CHANGELOG.md", *sorted(DOCS.glob("*.md"))]


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code: where markdown links and headings live."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    counts: dict[str, int] = {}
    for match in HEADING.finditer(FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(match[2])
        n = counts.get(base, 0)
        counts[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def test_readme_is_at_most_16_kb():
    size = README.stat().st_size
    assert size <= README_LIMIT, (
        f"README.md is {size:,} bytes, over {README_LIMIT:,}: move the detail into "
        "docs/ (one file per subject) and link it"
    )


def test_readme_keeps_the_install_and_test_commands_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    commands = re.findall(r"pip install [^>|;&\n]*[^>|;&\s]", ci) + re.findall(r"python -m pytest[^>|;&\n]*", ci)
    assert commands, ".ci/run no longer runs pip install / python -m pytest: update this test"
    text = README.read_text(encoding="utf-8")
    for command in commands:
        assert command.strip() in text, f"README.md must show the command .ci/run uses: {command.strip()}"


def test_configuration_md_is_the_generated_reference():
    path = DOCS / "configuration.md"
    assert path.exists(), f"docs/configuration.md is missing; generate it with: {REGENERATE}"
    assert path.read_text(encoding="utf-8") == reference.markdown(), (
        "docs/configuration.md differs from the reference generated from the schema "
        f"(vggft/config/reference.py, markdown()); regenerate it with: {REGENERATE}"
    )


def test_every_docs_page_is_linked_from_the_readme_and_exists():
    linked = {target.split("#")[0] for target in LINK.findall(prose(README.read_text(encoding="utf-8")))}
    docs = {target for target in linked if target.startswith("docs/")}
    assert docs, "README.md links no docs/ page"
    for target in sorted(docs):
        assert (ROOT / target).is_file(), f"README.md links {target}, which does not exist"
    orphans = sorted(f"docs/{path.name}" for path in DOCS.glob("*.md") if f"docs/{path.name}" not in docs)
    assert not orphans, f"docs pages that README.md does not link: {orphans}"


@pytest.mark.parametrize("page", pages(), ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path):
    broken = []
    for target in LINK.findall(prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        goal = (page.parent / file).resolve() if file else page
        if not goal.exists():
            broken.append(f"{target} (no file {goal.relative_to(ROOT) if goal.is_relative_to(ROOT) else goal})")
        elif anchor and goal.suffix == ".md" and anchor not in anchors(goal):
            broken.append(f"{target} (no heading with anchor #{anchor} in {goal.name})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def exit_codes() -> dict[int, list[str]]:
    """Exit code -> the error classes of vggft/utils/errors.py that carry it."""
    codes: dict[int, list[str]] = {}
    for name, value in vars(errors).items():
        if isinstance(value, type) and issubclass(value, errors.VggftError) and value.__module__ == errors.__name__:
            codes.setdefault(value.exit_code, []).append(name)
    return codes


def test_errors_md_has_a_section_per_exit_code():
    codes = exit_codes()
    assert 1 in codes and len(codes) > 1, f"found no error classes with exit codes in {errors.__file__}"
    headings = {
        int(m[1]): m[2]
        for m in re.finditer(r"^## (\d+) — (\S.*)$", (DOCS / "errors.md").read_text(encoding="utf-8"), re.MULTILINE)
    }
    missing = {code: names for code, names in codes.items() if code not in headings}
    assert not missing, f"docs/errors.md needs a section '## CODE — name' for exit codes {missing}"
    unknown = sorted(set(headings) - set(codes) - {0})
    assert not unknown, f"docs/errors.md has sections for exit codes no error class carries: {unknown}"
    assert list(headings) == sorted(headings), "docs/errors.md: order the exit code sections by code"


TEST_NAME = re.compile(r"tests/test_\w+\.py|\btest_\w+::|\btest_\w+\.py\b")


@pytest.mark.parametrize(
    "page", [p for p in pages() if p.name != "contributing.md"], ids=lambda path: str(path.relative_to(ROOT))
)
def test_user_facing_pages_name_no_tests(page: Path):
    found = TEST_NAME.findall(page.read_text(encoding="utf-8"))
    assert not found, f"{page.relative_to(ROOT)} names tests ({found}); say what is true, not which test proves it"


def top_level_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    return names


NOT_MODULES = {"vggft.json"}  # the metadata file inside an export archive


def has_name(module: Path, parts: list[str], name: str) -> bool:
    """``name`` is defined at the top of ``module`` (the file of ``parts``), or is a submodule of it."""
    return name in top_level_names(module) or (module.name == "__init__.py" and module_file([*parts, name]) is not None)


def module_file(parts: list[str]) -> Path | None:
    base = ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@pytest.mark.parametrize("page", pages(), ids=lambda path: str(path.relative_to(ROOT)))
def test_the_modules_and_names_the_docs_mention_exist(page: Path):
    """The package is being reorganised: a path or import in the docs must follow it."""
    text = page.read_text(encoding="utf-8")
    wrong = [path for path in set(re.findall(r"\bvggft/[\w/]+\.py\b", text)) if not (ROOT / path).is_file()]
    for dotted in set(re.findall(r"\bvggft(?:\.\w+)+", text)) - NOT_MODULES:
        parts = dotted.split(".")
        for length in range(len(parts), 1, -1):
            found = module_file(parts[:length])
            if found is not None:
                rest = parts[length:]
                if rest and not has_name(found, parts[:length], rest[0]):
                    wrong.append(dotted)
                break
        else:
            wrong.append(dotted)
    for module, names in re.findall(r"^\s*from (vggft[\w.]*) import ([\w, ]+)$", text, re.MULTILINE):
        parts = module.split(".")
        found = module_file(parts)
        if found is None:
            wrong.append(module)
            continue
        wrong += [f"{module}.{n.strip()}" for n in names.split(",") if not has_name(found, parts, n.strip())]
    assert not wrong, f"{page.relative_to(ROOT)} names modules or names that do not exist: {sorted(set(wrong))}"
