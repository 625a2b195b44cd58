"""The exact feature cache: same weights as the uncached path, persisted, invalidated per file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from conftest import make_image
from vggft.config.loading import load_config
from vggft.training.train import fit

SMALL = ["data.image_size=32", "data.resize=36", "train.epochs=2"]


@pytest.fixture
def train(pet, notes):
    """Train through the library API; return (the notes it logged, the saved state_dict)."""

    def run(*extra: str, weights: str = "models/VGG16.pt"):
        notes()
        cfg = load_config(None, [f"data.root={pet}", *SMALL, f"output.weights={weights}", *extra])
        result = fit(cfg)
        lines = notes()
        if result.test is not None:
            lines.append(f"Test: {result.test.summary_line()}")
        return lines, torch.load(weights, weights_only=True)

    return run


def test_cached_training_equals_uncached_training(train, pet):
    """Same seed, same shuffles, same dropout masks: the only difference is where the prefix ran."""
    for dropout in ("0.0", "0.5"):
        cached_log, cached = train(f"model.dropout={dropout}", weights="a.pt")
        plain_log, plain = train(f"model.dropout={dropout}", "cache.enabled=false", weights="b.pt")
        assert any(line.startswith("Feature cache: frozen prefix") for line in cached_log)
        assert "Feature cache off: cache.enabled is false" in plain_log
        assert not torch.equal(cached["classifier.6.weight"], torch.zeros_like(cached["classifier.6.weight"]))
        for key in cached:
            assert torch.allclose(cached[key], plain[key], atol=1e-6, rtol=1e-5), (dropout, key)
        test_line = [line for line in cached_log if line.startswith("Test:")]
        assert test_line == [line for line in plain_log if line.startswith("Test:")]


def test_warm_cache_runs_no_backbone_and_change_invalidates_one_file(train, pet, monkeypatch):
    first, _ = train()
    assert sum("images in" in line for line in first) == 2  # train and test extracted
    calls = []
    real_forward = torch.nn.Conv2d.forward
    monkeypatch.setattr(torch.nn.Conv2d, "forward", lambda self, x: calls.append(1) or real_forward(self, x))
    second, _ = train("train.lr=0.01")  # a sweep over lr reuses every row
    assert not any("images in" in line for line in second) and calls == []
    changed = pet / "train" / "cat" / "cat.0.jpg"
    make_image(changed, (0, 250, 0), seed=7)
    third, _ = train()
    extracted = [line for line in third if "images in" in line]
    assert len(extracted) == 1 and extracted[0].startswith("Extracting train features: 1 images")


def test_a_new_transform_is_a_new_cache(train, pet):
    train()
    lines, _ = train("data.normalize=symmetric")
    assert any(line.startswith("Extracting train features: 12 images") for line in lines)


def test_random_augmentation_or_unfrozen_backbone_turn_it_off_with_a_reason(train, pet):
    lines, _ = train("data.augment=light")
    assert any(line.startswith("Feature cache off: data.augment is 'light'") for line in lines)
    lines, _ = train("model.unfreeze=[block5]")
    assert any(line.startswith("Feature cache off: part of the backbone is unfrozen") for line in lines)


def test_damaged_or_malicious_shards_are_never_trusted(train, pet, evil_pickle):
    train()
    shards = sorted(Path(os.environ["VGGFT_CACHE"]).glob("features/*/*.pt"))
    assert len(shards) == 2
    shards[0].write_bytes(shards[0].read_bytes()[:1000])  # truncated
    payload, marker = evil_pickle
    torch.save({"keys": ["x"], "features": payload}, shards[1])
    lines, _ = train()
    assert sum("discarding damaged shard" in line for line in lines) == 2
    assert sum("images in" in line for line in lines) == 2  # both rebuilt
    assert not marker.exists()
