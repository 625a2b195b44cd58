"""Config loading: defaults, YAML, --set overrides, and one clear line for every mistake."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_one_line_error, invoke
from vggft.config import presets
from vggft.config.loading import load_config
from vggft.config.schema import Config, all_keys
from vggft.utils.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
README = Path(__file__).resolve().parent.parent / "README.md"


def test_defaults_are_the_pytorch_recipe():
    cfg = load_config()
    assert (cfg.data.image_size, cfg.data.resize, cfg.data.batch_size) == (224, 256, 4)
    assert (cfg.model.arch, cfg.model.weights, cfg.model.head) == ("vgg16", "IMAGENET1K_V1", "classifier6")
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.optimizer) == (5, 1e-4, "sgd")
    assert cfg.output.weights == "models/VGG16.pt"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "pet.yaml",
            {
                "data.image_size": 224,
                "data.resize": 256,
                "train.lr": 1e-4,
                "data.batch_size": 4,
                "train.epochs": 5,
                "model.head": "classifier6",
                "data.normalize": "imagenet",
            },
        ),
        (
            "keras_gap.yaml",
            {
                "data.image_size": 160,
                "data.resize": None,
                "data.normalize": "symmetric",
                "model.head": "gap",
                "data.split": [0.8, 0.1, 0.1],
            },
        ),
        ("demo.yaml", {"model.weights": None, "data.root": "data/demo"}),
    ],
)
def test_shipped_configs_load_as_their_recipes(name, expected):
    cfg = load_config(CONFIGS / name)
    for key, value in expected.items():
        section, field = key.split(".")
        assert getattr(getattr(cfg, section), field) == value, key


def test_configs_folder_holds_the_shipped_presets():
    """configs/*.yaml are the editable copies of the presets inside the package: the same files."""
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == [f"{n}.yaml" for n in presets.names()]
    for path in CONFIGS.glob("*.yaml"):
        assert path.read_bytes() == presets.find(path.stem).read_bytes(), path.name


def test_the_configuration_reference_lists_every_config_key():
    text = (README.parent / "docs" / "configuration.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("| `") and line.count("|") == 5]
    listed = [key for row in rows for key in re.findall(r"`([a-z_.]+)`", row.split("|")[1])]
    assert sorted(listed) == sorted(all_keys())


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\n  epochs: 3\ncache: off\n")
    cfg = load_config(path, ["train.epochs=1", "data.root=/x", "model.weights=null", "data.split=[0.7, 0.2, 0.1]"])
    assert cfg.train.lr == 1e-3  # PyYAML reads 1e-3 as a string; the field says float
    assert cfg.train.epochs == 1 and cfg.data.root == "/x" and cfg.model.weights is None
    assert cfg.cache.enabled is False and cfg.data.split == [0.7, 0.2, 0.1]


@pytest.mark.parametrize(
    "override, names, fix",
    [
        ("train.epocs=1", ["unknown key 'train.epocs'"], "'train.epochs'"),
        ("optimizer=adam", ["unknown key 'optimizer'"], "'train.optimizer'"),
        ("train.lr=fast", ["train.lr", "'fast'"], "expected a number"),
        ("train.epochs=1.5", ["train.epochs", "1.5"], "expected a whole number"),
        ("data.batch_size=0", ["data.batch_size", "got 0"], "greater than 0"),
        ("model.head=mlp", ["model.head", "'mlp'"], "'classifier6', 'gap'"),
        ("data.split=[0.5, 0.5]", ["data.split", "[0.5, 0.5]"], "three fractions"),
        ("train.epochs", ["--set 'train.epochs'"], "KEY=VALUE"),
    ],
)
def test_config_errors_name_key_expected_and_given(runner, override, names, fix):
    assert_one_line_error(invoke(runner, "summary", "--set", override), code=2, names=["--set", *names], fix=fix)


def test_bad_yaml_and_missing_file(runner, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1\n")
    assert_one_line_error(
        invoke(runner, "summary", "--config", bad), code=2, names=[f"{bad}: line"], fix="fix the YAML syntax"
    )
    assert_one_line_error(
        invoke(runner, "summary", "--config", tmp_path / "nope.yaml"),
        code=2,
        names=[str(tmp_path / "nope.yaml"), "not found"],
        fix="an existing YAML file",
    )


def test_debug_shows_the_traceback(runner):
    with pytest.raises(ConfigError):
        invoke(runner, "--debug", "summary", "--set", "train.epocs=1")


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
known_keys = st.sampled_from(all_keys())


@settings(max_examples=300, deadline=None)
@given(
    document=st.dictionaries(
        st.sampled_from(["data", "model", "train", "cache", "output", "x"]),
        st.dictionaries(
            st.text(max_size=12) | st.sampled_from([k.split(".")[1] for k in all_keys()]), yaml_values, max_size=4
        )
        | yaml_values,
        max_size=5,
    )
)
def test_any_yaml_document_is_a_config_or_a_config_error(tmp_path_factory, document):
    path = tmp_path_factory.mktemp("h") / "c.yaml"
    path.write_text(yaml.safe_dump(document))
    try:
        load_config(path)
    except ConfigError:
        pass


@settings(max_examples=300, deadline=None)
@given(key=known_keys | st.text(max_size=20), value=st.text(max_size=20))
def test_any_override_string_is_a_config_or_a_config_error(key, value):
    try:
        load_config(None, [f"{key}={value}"])
    except ConfigError:
        pass


def test_a_base_config_is_left_as_it_was():
    """A checkpoint's or sidecar's config given as ``base`` is read, never written into by --set."""
    base = Config().to_dict()
    before = yaml.safe_dump(base)
    cfg = load_config(None, ["train.epochs=7", "data.root=elsewhere"], base=base)
    assert cfg.train.epochs == 7 and cfg.data.root == "elsewhere"
    assert yaml.safe_dump(base) == before


@pytest.mark.parametrize(
    "text, key, first, again",
    [
        ("train:\n  epochs: 1\n  lr: 0.01\ndata:\n  root: x\ntrain:\n  epochs: 5\n", "train", 1, 6),
        ("train:\n  lr: 0.01\n  epochs: 2\n  lr: 0.1\n", "lr", 2, 4),
    ],
)
def test_a_key_given_twice_in_a_yaml_file_is_refused_naming_both_lines(runner, tmp_path, text, key, first, again):
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    result = invoke(runner, "train", "--config", path)
    assert_one_line_error(
        result, code=2, names=[str(path), f"line {again}", f"'{key}'", f"first at line {first}"], fix="keep one"
    )


def test_keys_a_yaml_merge_brings_in_may_still_be_overridden(tmp_path):
    path = tmp_path / "merged.yaml"
    path.write_text("train: &base\n  epochs: 1\n  lr: 0.01\nmodel:\n  head: gap\n")
    assert load_config(path).train.epochs == 1
    path.write_text("data:\n  root: x\ntrain:\n  <<: {epochs: 1, lr: 0.01}\n  epochs: 3\n")
    assert load_config(path).train.epochs == 3 and load_config(path).train.lr == 0.01
