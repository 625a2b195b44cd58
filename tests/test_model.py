"""Building the model: torchvision's weights loading (offline, from a fake hub), heads, freezing."""

from __future__ import annotations

import importlib.util
import mmap
import os
import urllib.error
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import FAST, assert_one_line_error, invoke
from tiny import tiny_vgg
from vggft.config.schema import ModelConfig
from vggft.model.build import build_model as _build_model
from vggft.model.build import conv_blocks, describe_state_dict, parameter_counts, split_frozen_prefix
from vggft.model.pretrained import pretrained_state_dict
from vggft.model.safe_load import read_state_dict
from vggft.utils.errors import ConfigError, WeightsError
from vggft.utils.files import file_digest


def build_model(cfg: ModelConfig, num_classes: int):
    return _build_model(cfg, num_classes, pretrained_state_dict(cfg))


def _hub_file() -> str:
    return os.path.join(os.environ["TORCH_HOME"], "hub", "checkpoints", "vgg16-397923af.pth")


@pytest.mark.real_vgg
def test_imagenet_weights_come_from_the_torch_hub_folder():
    model = build_model(ModelConfig(), num_classes=3)
    pretrained = torch.load(_hub_file(), weights_only=True)
    for key in ("features.0.weight", "features.28.bias", "classifier.0.weight", "classifier.3.weight"):
        assert torch.equal(model.state_dict()[key], pretrained[key])
    assert model.classifier[6].out_features == 3
    assert parameter_counts(model) == (134_272_835, 12_291)


def _own_hub(tmp_path, monkeypatch, legacy: bool = False) -> Path:
    """A copy of the session's fake hub as $TORCH_HOME (in torch.save's legacy format if asked)."""
    home = tmp_path / "torch_home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    state = torch.load(_hub_file(), weights_only=True)
    monkeypatch.setenv("TORCH_HOME", str(home))
    torch.save(state, _hub_file(), _use_new_zipfile_serialization=not legacy)
    return Path(_hub_file())


def _mapped(path: Path) -> bool:
    return str(path) in Path("/proc/self/maps").read_text()


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc")
def test_the_hub_file_is_mapped_and_a_run_that_trains_its_layers_leaves_it_as_it_was(
    runner, pet, tmp_path, monkeypatch
):
    """The frozen layers' tensors are pages of the hub file (mapped, not read: 0.2 s a run on the real
    528 MB file), private to the process whatever its default mapping: training block5 in place writes none
    of it back."""
    hub = _own_hub(tmp_path, monkeypatch)
    before = file_digest(hub)
    model = build_model(ModelConfig(), 2)
    assert torch.equal(model.features[0].weight, torch.load(hub, weights_only=True)["features.0.weight"])
    assert _mapped(hub) or importlib.util.find_spec("torch.utils.serialization") is None  # torch < 2.5 reads it
    del model
    with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):  # a host program's default: not ours
        result = invoke(
            runner,
            "train",
            "--set",
            f"data.root={pet}",
            *FAST,
            "--set",
            "model.unfreeze=[block5]",
            "--set",
            "train.lr=0.5",
        )
    assert result.exit_code == 0, result.output
    trained = torch.load("models/VGG16.pt", weights_only=True)["features.28.weight"]
    assert not torch.equal(trained, torch.load(hub, weights_only=True)["features.28.weight"])  # it did train
    assert file_digest(hub) == before


def test_a_hub_file_in_the_legacy_format_is_read(tmp_path, monkeypatch):
    hub = _own_hub(tmp_path, monkeypatch, legacy=True)
    model = build_model(ModelConfig(), 2)
    assert torch.equal(model.classifier[3].weight, torch.load(hub, weights_only=True)["classifier.3.weight"])


def test_a_local_pth_file_works_like_the_name(tmp_path):
    local = tmp_path / "backbone.pth"
    torch.save(torch.load(_hub_file(), weights_only=True), local)
    model = build_model(ModelConfig(weights=str(local)), num_classes=2)
    assert torch.equal(model.features[0].weight, torch.load(local, weights_only=True)["features.0.weight"])


@pytest.mark.real_vgg
def test_heads_and_counts():
    assert parameter_counts(build_model(ModelConfig(), 2)) == (134_268_738, 8_194)
    assert parameter_counts(build_model(ModelConfig(head="gap"), 2)) == (14_978_370, 263_682)


@pytest.mark.real_vgg
def test_frozen_prefix_cut_points():
    _, suffix, cut = split_frozen_prefix(build_model(ModelConfig(), 2))
    assert cut == "classifier.1" and isinstance(suffix[0], nn.Dropout)
    _, suffix, cut = split_frozen_prefix(build_model(ModelConfig(head="gap"), 2))
    assert cut == "flatten" and suffix[0].in_features == 512


def test_prefix_and_suffix_compose_to_the_model():
    model = build_model(ModelConfig(), 2).eval()
    prefix, suffix, _ = split_frozen_prefix(model)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(suffix.eval()(prefix(x)), model(x))


@pytest.mark.real_vgg
def test_unfreeze_makes_exactly_the_named_block_trainable():
    model = build_model(ModelConfig(unfreeze=["block5"]), 2)
    blocks = conv_blocks(model)
    assert len(blocks) == 5
    assert all(p.requires_grad for m in blocks[4] for p in m.parameters())
    assert not any(p.requires_grad for b in blocks[:4] for m in b for p in m.parameters())
    assert parameter_counts(build_model(ModelConfig(unfreeze=1), 2))[1] == 8_194 + 3 * 2_359_808
    with pytest.raises(ConfigError, match="unknown block 'block9'"):
        build_model(ModelConfig(unfreeze=["block9"]), 2)


def test_missing_pretrained_file_without_network_is_one_clear_error(runner, pet, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "urlopen", offline)  # torch.hub's download, even where there is a network
    result = invoke(runner, "train", "--set", f"data.root={pet}", "-q")
    assert_one_line_error(
        result,
        code=4,
        after_notes=True,
        names=[
            "model.weights",
            "vgg16 IMAGENET1K_V1",
            str(tmp_path / "empty_home" / "hub" / "checkpoints" / "vgg16-397923af.pth"),
            f"TORCH_HOME is {tmp_path / 'empty_home'}",
        ],
        fix="set TORCH_HOME to the folder whose hub/checkpoints/ holds it",
    )
    assert "Downloading:" in result.stderr  # torch.hub's line, a note, never on stdout (kept for results)
    assert not (tmp_path / "models").exists()  # nothing half-written


def test_weights_for_another_architecture_are_refused(tmp_path):
    path = tmp_path / "vgg11.pth"
    torch.save(tiny_vgg("vgg11").state_dict(), path)
    with pytest.raises(WeightsError, match="does not fit vgg16.*set model.arch"):
        build_model(ModelConfig(weights=str(path)), 2)


def test_describe_state_dict_reads_arch_head_and_classes():
    model = build_model(ModelConfig(head="gap"), 5)
    assert describe_state_dict(model.state_dict()) == ("vgg16", "gap", 5)
    assert describe_state_dict(tiny_vgg("vgg11").state_dict()) == ("vgg11", "classifier6", 1000)


def test_a_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path, evil_pickle):
    payload, marker = evil_pickle
    path = tmp_path / "evil.pt"
    torch.save({"features.0.weight": torch.zeros(1), "x": payload}, path)
    with pytest.raises(WeightsError, match="pickled code"):
        read_state_dict(path, "--weights")
    assert not marker.exists()
