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
from vggft.config.loading import RESUMABLE_KEYS
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
            if isinstance(hint, type) and dataclasses.is_dataclass(hint):
                walk(hint, f"{prefix}{node.target.id}.")
                continue
            after = body[index + 1] if index + 1 < len(body) else None
            doc = (
                after.value.value
                if (
                    isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)
                )
                else ""
            )
            docs[f"{prefix}{node.target.id}"] = " ".join(inspect.cleandoc(doc).split())

    walk(Config, "")
    return docs


def defaults_yaml(width: int = 100) -> str:
    """Every key with its default, its accepted values and its doc comment: a config file to start from."""
    docs, defaults = key_docs(), Config().to_dict()
    lines = [
        "# Every vggft config key with its default (vggft configs --defaults). Copy it, keep the keys you",
        "# change, and pass the file with --config; any key can also be set with --set KEY=VALUE.",
    ]
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


def markdown() -> str:
    """docs/configuration.md: how configs layer, the presets, and every key (default, values, meaning) per
    section, from the same source as ``defaults_yaml``. Regenerate the file with
    ``python -c "from vggft.config import reference; print(reference.markdown(), end='')" > docs/configuration.md``."""
    from vggft.config import presets

    lines = _markdown_intro()
    lines += [f"| `{name}` | {_cell(presets.description(name))} |" for name in presets.names()]
    docs, defaults = key_docs(), Config().to_dict()
    section = None
    for key, doc in docs.items():
        parent = key.split(".")[0]
        if parent != section:
            section = parent
            lines += ["", f"## `{section}`", "", "| key | default | values | meaning |", "|---|---|---|---|"]
        default, meaning = _yaml_value(_lookup(defaults, key)), _cell(doc) or "-"
        lines.append(f"| `{key}` | `{_cell(default)}` | {_cell(describe_type(_hint(key)))} | {meaning} |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """``text`` as one Markdown table cell."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _markdown_intro() -> list[str]:
    """configuration.md up to the presets table: how --config, --set and --resume layer."""
    return [
        "# Configuration",
        "",
        "<!-- Generated from vggft/config/reference.py (the source of `vggft configs --defaults`); do not edit. "
        "Regenerate: python -c \"from vggft.config import reference; print(reference.markdown(), end='')\" "
        "> docs/configuration.md -->",
        "",
        "Every command takes `--config FILE.yaml` (or a preset name) and any number of `--set KEY=VALUE` "
        "overrides, e.g. `--set train.epochs=1 --set data.root=/x`. `vggft configs --defaults` prints every key "
        "below as a YAML file that loads back: `vggft configs --defaults > my.yaml`, keep the keys you change, "
        "then `--config my.yaml`.",
        "",
        "## How the layers combine",
        "",
        "1. The defaults below (the PyTorch tutorial's recipe).",
        "2. `--config`: a YAML file, or a shipped preset by name (`--config pet`). A file of that name, when "
        "there is one, wins over a preset; a file sets only the keys it names.",
        "3. `--set KEY=VALUE`, in the order given; the value is read as YAML (`--set data.split=[0.7,0.2,0.1]`, "
        "`--set model.weights=null`).",
        "",
        "`eval`, `predict`, `explain` and `export` put the saved weights' own config (from their sidecar) under "
        "step 2, so a model is read as it was trained; what the weights file holds (architecture, head, class "
        "count) wins over any config.",
        "",
        "`vggft train --resume runs/NAME/last.pt` starts from the run's own saved config instead, and takes "
        "`--set` only for the keys that can still take effect: "
        + ", ".join(f"`{key}`" for key in RESUMABLE_KEYS)
        + "; `--config` is refused.",
        "",
        "YAML's `off`/`on`/`no`/`yes` are booleans; every key documented with `off` takes them (`train.amp: off`, "
        "`data.augment: off` for `none`), and `cache: off` is short for `cache.enabled: false`. A renamed key "
        "keeps working through `vggft.config.loading.RENAMED_KEYS`. A mistake (an unknown key, a "
        "wrong type or value, settings that would do nothing) is one line naming where the value came from "
        "(the file, or `--set`), the key, what was expected and what was given, before any work: exit code 2 "
        "(see [errors](errors.md#2--config)).",
        "",
        "## Presets",
        "",
        "Shipped inside the package, so `--config NAME` works from any folder; `configs/` in the source tree holds "
        "the same files to copy. `vggft configs` lists them, `vggft configs --show NAME` prints one.",
        "",
        "| preset | recipe |",
        "|---|---|",
    ]
