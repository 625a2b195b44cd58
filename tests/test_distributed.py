"""Two CPU processes with gloo: one set of outputs, every test image counted once, numbers as one process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from conftest import FAST, invoke, make_folder, tiny_subprocess_env
from vggft.distributed import SINGLE, Group, reduce_metrics
from vggft.metrics import Metrics


def test_shards_hold_every_item_once():
    items = list(range(7))
    shards = [Group(rank, 3).shard(items) for rank in range(3)]
    assert sorted(x for shard in shards for x in shard) == items and [len(s) for s in shards] == [3, 2, 2]
    assert SINGLE.shard(items) == items
    metrics = Metrics.empty(["a", "b"])
    assert reduce_metrics(metrics, SINGLE) is metrics  # one process: nothing to sum


def test_two_processes_train_like_one(runner, tmp_path):
    # 7 test images over 2 ranks (4 + 3) and 3 val images (2 + 1): uneven shards on purpose.
    pet = make_folder(tmp_path / "pet", {"train": {"cat": 6, "dog": 6}, "val": {"cat": 1, "dog": 2},
                                         "test": {"cat": 3, "dog": 4}})
    env = tiny_subprocess_env()
    result = subprocess.run(
        [sys.executable, "-m", "vggft", "train", "--nproc", "2", "--set", f"data.root={pet}", *FAST],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out, notes = result.stdout, result.stderr
    assert "device cpu x 2 processes" in notes
    assert "Extracting train features: 12 images" in notes and "on 2 processes" in notes
    # Only rank 0 speaks and writes: one line per epoch, one run folder, one weights file.
    assert len(re.findall(r"^Epoch +1/2", notes, re.M)) == 1 and len(re.findall(r"^Test:", out, re.M)) == 1
    assert sorted(p.name for p in Path("runs").iterdir()) == ["train"]
    assert sorted(p.name for p in Path("models").iterdir()) == ["VGG16.json", "VGG16.pt"]
    assert re.search(r"val acc@1 [\d.]+% \(\d/3\)", notes)  # 3 val images, none padded in or dropped
    test_line = re.search(r"^Test: (acc@1 [\d.]+% \(\d+/7\))$", out, re.M)
    assert test_line, out
    # Each rank extracted its own shard into the shared cache: shards from two processes.
    shards = list(Path(os.environ["VGGFT_CACHE"]).rglob("features/*/*.pt"))
    assert len({shard.stem.split("-")[1] for shard in shards}) == 2

    # The same weights scored by one process: the same count.
    single = invoke(runner, "eval", "--weights", "models/VGG16.pt", "-q")
    assert single.exit_code == 0, single.output
    assert single.stdout.splitlines()[0] == test_line[1]
    weights = torch.load("models/VGG16.pt", weights_only=True)
    assert weights["classifier.6.weight"].shape == (2, 32)  # the tiny stand-in's classifier


def test_a_bad_config_under_nproc_is_one_line(runner, pet):
    result = invoke(runner, "train", "--nproc", "2", "--set", f"data.root={pet}", "--set", "train.epocs=1")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --set: unknown key 'train.epocs'; did you mean 'train.epochs'?"
