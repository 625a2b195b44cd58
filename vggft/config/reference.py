"""The key reference: every config key's default, accepted values and doc comment, read from the schema.

``vggft configs --defaults`` prints it as YAML; docs/configuration.md is generated from the same source.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing

import yaml

from vggft.config import schema
from vggft.config.schema import Config, describe_type


def key_docs() -> dict[str, str]:
    """Every dotted config key's doc comment (the string under its field in the schema), '' where none."""
    docs: dict[str, str] = {}
    tree = ast.parse(inspect.getsource(schema))
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

    walk(Config, "")
    return docs


def defaults_yaml(width: int = 100) -> str:
    """Every key with its default, its accepted values and its doc comment: a config file to start from."""
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
        comment = f"({describe_type(hint)}) {doc}".strip()
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
    cls = Config
    *parents, leaf = key.split(".")
    for part in parents:
        cls = typing.get_type_hints(cls)[part]
    return typing.get_type_hints(cls)[leaf]


def _yaml_value(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()
