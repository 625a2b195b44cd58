"""The shipped recipes (``--config pet``, ``keras_gap``, ``demo``) and every key's default, as YAML.

The YAML files beside this module travel inside the package, so ``--config pet`` works from any folder;
``configs/`` in the source tree holds the same files for users to copy and edit (a test keeps them equal).
Like config.py, this module imports no torch: ``vggft configs`` answers in milliseconds.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from pathlib import Path

import yaml

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


def key_docs() -> dict[str, str]:
    """Every dotted config key's doc comment (the string under its field in config.py), '' where none."""
    from vggft.config import schema as config

    docs: dict[str, str] = {}
    tree = ast.parse(inspect.getsource(config))
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}

    def walk(cls: type, prefix: str) -> None:
        body = classes[cls.__name__].body
        for index, node in enumerate(body):
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            hint = typing.get_type_hints(cls)[node.target.id]
            if dataclasses.is_dataclass(hint):
                walk(hint, f"{prefix}{node.target.id}.")
                continue
            after = body[index + 1] if index + 1 < len(body) else None
            doc = after.value.value if (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                                        and isinstance(after.value.value, str)) else ""
            docs[f"{prefix}{node.target.id}"] = " ".join(inspect.cleandoc(doc).split())

    walk(config.Config, "")
    return docs


def defaults_yaml(width: int = 100) -> str:
    """Every key with its default, its accepted values and its doc comment: a config file to start from."""
    from vggft.config.schema import Config, _describe

    docs, defaults = key_docs(), Config().to_dict()
    lines = ["# Every vggft config key with its default (vggft configs --defaults). Copy it, keep the keys you",
             "# change, and pass the file with --config; any key can also be set with --set KEY=VALUE."]
    section = None
    for key, doc in docs.items():
        *parents, leaf = key.split(".")
        if parents[0] != section:
            section = parents[0]
            lines.append(f"{section}:")
        if len(parents) > 1 and key == _first_key_of(docs, parents):
            lines.append(f"{'  ' * (len(parents) - 1)}{parents[-1]}:")
        indent = "  " * len(parents)
        value = _lookup(defaults, key)
        hint = _hint(key)
        comment = f"({_describe(hint)}) {doc}".strip()
        lines += textwrap.wrap(comment, width, initial_indent=f"{indent}# ", subsequent_indent=f"{indent}# ")
        lines.append(f"{indent}{leaf}: {_yaml_value(value)}")
    return "\n".join(lines) + "\n"


def _first_key_of(docs: dict[str, str], parents: list[str]) -> str:
    prefix = ".".join(parents) + "."
    return next(key for key in docs if key.startswith(prefix))


def _lookup(tree: dict, key: str):
    for part in key.split("."):
        tree = tree[part]
    return tree


def _hint(key: str):
    from vggft.config.schema import Config

    cls = Config
    *parents, leaf = key.split(".")
    for part in parents:
        cls = typing.get_type_hints(cls)[part]
    return typing.get_type_hints(cls)[leaf]


def _yaml_value(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()
