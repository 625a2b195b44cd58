"""bf16 where the CPU computes it natively (train.amp: auto), and JPEGs decoded at the size they are needed
(data.decode: draft). Both paths are forced here, so they are tested on any CPU (slowly, at 32 px)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from conftest import FAST, invoke, make_image
from vggft.config.schema import DataConfig
from vggft.data.decode import DraftImageList, draft_target, open_rgb_draft, resolve_decode
from vggft.data.loaders import ImageList
from vggft.data.transforms import eval_transform
from vggft.utils import device as device_module
from vggft.utils.device import autocast_dtype, cpu_bf16, environment_line

CPU = torch.device("cpu")


def test_auto_is_bf16_only_where_the_cpu_computes_it(monkeypatch):
    monkeypatch.setenv("VGGFT_CPU_BF16", "1")
    assert autocast_dtype(CPU, "auto") == torch.bfloat16 and autocast_dtype(CPU, "off") is None
    assert "bf16 (native bf16 on this CPU: VGGFT_CPU_BF16=1)" in environment_line("train", CPU, torch.bfloat16)
    assert "fp32 (train.amp: off)" in environment_line("train", CPU, None)
    monkeypatch.setenv("VGGFT_CPU_BF16", "0")
    assert autocast_dtype(CPU, "auto") is None and autocast_dtype(CPU, "bf16") == torch.bfloat16
    assert "fp32 (VGGFT_CPU_BF16=0)" in environment_line("train", CPU, None)  # forced, and said so
    assert "bf16 (train.amp: bf16, emulated" in environment_line("train", CPU, torch.bfloat16)


def test_the_probe_asks_torch_and_falls_back_to_fp32(monkeypatch):
    monkeypatch.delenv("VGGFT_CPU_BF16")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert cpu_bf16() == "AVX512-BF16"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert cpu_bf16() == "AMX"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")  # oneDNN held below its bf16 kernels: emulated, so fp32
    assert cpu_bf16() is None and autocast_dtype(CPU, "auto") is None
    assert "fp32 (ONEDNN_MAX_CPU_ISA=AVX2 holds oneDNN below its bf16 kernels)" in environment_line("train", CPU, None)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert cpu_bf16() == "AMX"
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")

    def broken() -> bool:
        raise RuntimeError("no cpuinfo")

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", broken, raising=False)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)  # an older torch
    assert cpu_bf16() is None and autocast_dtype(CPU, "auto") is None
    monkeypatch.setattr(device_module.torch.backends.mkldnn, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert cpu_bf16() is None  # no oneDNN: nothing would use the unit


def _cache_folders(root: Path) -> dict[str, tuple[Path, dict]]:
    folders = {}
    for namespace in (root / "features").glob("*/namespace.json"):
        keys = json.loads(namespace.read_text())
        folders[keys["precision"]] = namespace.parent, keys
    return folders


def test_auto_extracts_in_bf16_on_such_a_cpu_in_its_own_cache(runner, pet, tmp_path, monkeypatch):
    """The prefix runs in bf16; the head over its cached rows in fp32 (as sweep fits heads: autocast only adds
    weight casts to a few small matmuls)."""
    monkeypatch.setenv("VGGFT_CPU_BF16", "1")
    computed: set[tuple[bool, torch.dtype]] = set()
    linear = nn.Linear.forward

    def spy(self, x):
        out = linear(self, x)
        computed.add((self.out_features == 2, out.dtype))  # the head: 2 classes
        return out

    monkeypatch.setattr(nn.Linear, "forward", spy)
    result = invoke(runner, "train", "--set", f"data.root={pet}", *FAST[:-1])
    assert result.exit_code == 0, result.output
    assert computed == {(False, torch.bfloat16), (False, torch.float32), (True, torch.float32)}, computed
    monkeypatch.setattr(nn.Linear, "forward", linear)
    assert ", bf16 (native bf16 on this CPU: VGGFT_CPU_BF16=1), " in result.stderr.splitlines()[0]
    assert json.loads(Path("models/VGG16.json").read_text())["precision"] == "bf16"  # the sidecar says it too
    result = invoke(runner, "train", "--set", f"data.root={pet}", "--set", "train.amp=off", *FAST[:-1])
    assert result.exit_code == 0, result.output
    assert ", fp32 (train.amp: off), " in result.stderr.splitlines()[0]
    assert json.loads(Path("models/VGG16.json").read_text())["precision"] == "fp32"
    folders = _cache_folders(tmp_path / "cache")
    assert set(folders) == {"torch.bfloat16", "fp32"}  # each precision's rows apart
    assert all(keys["decode"] == "draft" for _, keys in folders.values())  # auto on a CPU
    rows: dict[str, dict[str, torch.Tensor]] = {precision: {} for precision in folders}
    for precision, (folder, _) in folders.items():
        for shard in folder.glob("*.pt"):
            body = torch.load(shard, weights_only=True)
            rows[precision].update(zip(body["keys"], body["features"], strict=True))
    assert rows["fp32"].keys() == rows["torch.bfloat16"].keys()
    fp32 = torch.stack([rows["fp32"][key] for key in sorted(rows["fp32"])])
    bf16 = torch.stack([rows["torch.bfloat16"][key] for key in sorted(rows["fp32"])])
    assert bf16.dtype == torch.float32 and 0 < float((bf16 - fp32).norm() / fp32.norm()) < 0.05


def test_an_unfrozen_backbone_trains_under_bf16_autocast_with_fp32_weights(runner, pet, monkeypatch):
    monkeypatch.setenv("VGGFT_CPU_BF16", "1")
    computed: set[torch.dtype] = set()
    convolve = nn.Conv2d.forward

    def spy(self, x):
        out = convolve(self, x)
        computed.add(out.dtype)
        return out

    monkeypatch.setattr(nn.Conv2d, "forward", spy)
    result = invoke(runner, "train", "--set", f"data.root={pet}", "--set", "model.unfreeze=1", *FAST[:-1])
    assert result.exit_code == 0, result.output
    assert "Feature cache off" in result.stderr and ", bf16 (" in result.stderr.splitlines()[0]
    assert computed == {torch.bfloat16}
    saved = torch.load("models/VGG16.pt", weights_only=True)
    assert all(value.dtype == torch.float32 for value in saved.values() if value.is_floating_point())


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_the_optimizers_step_with_fused_kernels_on_the_cpu(optimizer):
    """One kernel per tensor instead of one per operation: Adam's step over vgg11_bn was 5x faster fused."""
    from vggft.config.schema import TrainConfig
    from vggft.training.optim import make_optimizer

    head, backbone = nn.Linear(4, 2), nn.Linear(3, 4)
    made = make_optimizer(TrainConfig(optimizer=optimizer), list(head.parameters()), list(backbone.parameters()))
    assert made.defaults["fused"] is True
    elsewhere = make_optimizer(TrainConfig(optimizer=optimizer), list(nn.Linear(4, 2, device="meta").parameters()))
    assert not elsewhere.defaults.get("fused")  # not on the CPU or CUDA (MPS, ...): torch's default path


@pytest.mark.parametrize("resize", [36, None])
def test_draft_decodes_a_large_jpeg_at_the_smallest_scale_it_needs(tmp_path, resize):
    data = DataConfig(image_size=32, resize=resize)
    big = make_image(tmp_path / "big.jpg", (200, 120, 60), size=(640, 480), fmt="JPEG")
    png = make_image(tmp_path / "big.png", (200, 120, 60), size=(640, 480), fmt="PNG")
    target = draft_target(data)
    assert target == (resize or 32)
    image = open_rgb_draft(str(big), target)
    assert min(image.size) >= target and min(image.size) < 2 * target  # 1/8 of 480 is 60: at least 36, 32
    assert image.size == (80, 60) and image.mode == "RGB"
    transform = eval_transform(data)
    pil, draft = ImageList([(str(big), 0)], transform)[0][0], DraftImageList([(str(big), 0)], transform, target)[0][0]
    assert pil.shape == draft.shape == (3, 32, 32) and float((pil - draft).abs().mean()) < 0.05
    # Other formats, and JPEGs under twice the target, decode exactly as pil does
    assert torch.equal(
        ImageList([(str(png), 0)], transform)[0][0], DraftImageList([(str(png), 0)], transform, 36)[0][0]
    )
    small = make_image(tmp_path / "small.jpg", (20, 90, 160), size=(60, 50), fmt="JPEG")
    with Image.open(small) as opened:
        assert open_rgb_draft(str(small), target).size == opened.size


def test_predict_decodes_as_the_cache_does(tmp_path):
    """predict's images: draft where data.decode resolves to it (auto on a CPU), whole with pil, as eval's rows."""
    from vggft.model.inference import image_loader

    big = str(make_image(tmp_path / "big.jpg", (200, 120, 60), size=(640, 480), fmt="JPEG"))
    data = DataConfig(image_size=32, resize=36)
    drafted = DraftImageList([(big, 0)], eval_transform(data), 36)[0][0]
    (auto, _), *_ = image_loader([big], data, 1, CPU)
    (whole, _), *_ = image_loader([big], DataConfig(image_size=32, resize=36, decode="pil"), 1, CPU)
    assert torch.equal(auto[0], drafted) and torch.equal(whole[0], ImageList([(big, 0)], eval_transform(data))[0][0])
    assert not torch.equal(auto, whole)


def test_draft_is_what_auto_means_on_a_cpu_and_a_cache_of_its_own(runner, pet, tmp_path):
    assert resolve_decode("auto", CPU) == "draft" and resolve_decode("draft", torch.device("cuda")) == "draft"
    for choice in ("auto", "pil"):
        result = invoke(runner, "train", "--set", f"data.root={pet}", "--set", f"data.decode={choice}", *FAST)
        assert result.exit_code == 0, result.output
    decodes = sorted(
        json.loads(p.read_text())["decode"] for p in (tmp_path / "cache").glob("features/*/namespace.json")
    )
    assert decodes == ["draft", "pil"]
