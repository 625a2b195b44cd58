"""Nothing lost, nothing executed, nothing cryptic: the README's error table, atomic saves, reproducibility."""

from __future__ import annotations

import os
from collections import namedtuple
from pathlib import Path

import pytest
import torch

import vggft.training.loop
import vggft.utils.files
from conftest import FAST, assert_one_line_error, invoke
from tiny import tiny_vgg, tutorial_model


def _train(runner, pet, *args):
    return invoke(runner, "train", "--set", f"data.root={pet}", *FAST, *args)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*.tmp"))


def _loads_in_plain_torchvision(path: Path, classes: int = 2) -> None:
    tutorial_model(classes).load_state_dict(torch.load(path, weights_only=True))


def test_a_save_that_fails_midway_leaves_the_old_weights(runner, pet, monkeypatch):
    assert _train(runner, pet).exit_code == 0
    weights = Path("models/VGG16.pt")
    before = weights.read_bytes()

    def disk_full(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"PK\x03\x04 half a zip")  # some bytes reach the disk, then it fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(vggft.utils.files.torch, "save", disk_full)
    assert_one_line_error(
        _train(runner, pet, "--set", "train.lr=0.5"),
        code=6,
        after_notes=True,
        names=["runs/train2/best.pt", "disk full"],
        fix="free some space",
    )
    assert weights.read_bytes() == before
    _loads_in_plain_torchvision(weights)
    assert _leftovers(Path(".")) == []


def test_weights_and_sidecar_from_different_runs(runner, pet):
    """A 3-class state_dict beside the 2-class run's sidecar: refused, never labelled with the wrong names."""
    assert _train(runner, pet).exit_code == 0
    torch.save(tutorial_model(3).state_dict(), "models/VGG16.pt")
    assert_one_line_error(
        invoke(runner, "eval", "-q"),
        code=4,
        after_notes=True,
        names=["models/VGG16.json", "other weights", "'models/VGG16.pt'"],
        fix="delete the sidecar",
    )


def test_two_seeded_runs_give_byte_identical_weights(runner, pet):
    """Shuffling, dropout and the head's init all come from train.seed."""
    weights, tests, saved = Path("models/VGG16.pt"), [], []
    for _ in range(2):  # torch.save embeds the file's stem, so both runs write the same name
        result = _train(runner, pet, "--set", "cache=off")
        assert result.exit_code == 0, result.output
        tests += [line for line in result.stdout.splitlines() if line.startswith("Test:")]
        saved.append(weights.read_bytes())
    assert saved[0] == saved[1]
    first, second = (torch.load(f"runs/{run}/last.pt", weights_only=True) for run in ("train", "train2"))
    assert first["model"].keys() == second["model"].keys()  # the checkpoints differ only in timings
    assert all(torch.equal(first["model"][k], second["model"][k]) for k in first["model"])
    assert len(tests) == 2 and tests[0] == tests[1]


def test_output_folder_not_writable(runner, pet):
    Path("blocker").write_text("a file where a folder should be")
    assert_one_line_error(
        _train(runner, pet, "--set", "output.weights=blocker/VGG16.pt"),
        code=6,
        after_notes=True,
        names=["output.weights", "cannot write to 'blocker'"],
        fix="--set output.weights=PATH",
    )
    assert not Path("runs").exists() and not Path("models").exists()


def test_not_enough_free_disk_stops_before_any_work(runner, pet, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(
        vggft.utils.files.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 20 * 2**10, 20 * 2**10)
    )
    assert_one_line_error(
        _train(runner, pet),
        code=6,
        after_notes=True,
        names=["output.weights", "KiB will be written under", "only 20 KiB is free"],
        fix="free some space",
    )
    assert not Path("runs").exists() and not Path("models").exists()


def test_out_of_memory_names_the_batch_size(runner, pet, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(vggft.training.loop, "train_one_epoch", oom)
    assert_one_line_error(
        _train(runner, pet, "--set", "data.batch_size=8"),
        code=7,
        after_notes=True,
        names=["out of memory on cpu", "data.batch_size 8", "data.eval_batch_size 32"],
        fix="--set data.batch_size=4",
    )


def test_cpu_allocator_failure_is_out_of_memory_too(runner, pet, monkeypatch):
    def oom(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(vggft.training.loop, "train_one_epoch", oom)
    assert_one_line_error(
        _train(runner, pet),
        code=7,
        after_notes=True,
        names=["out of memory on cpu", "data.batch_size 4"],
        fix="--set data.batch_size=2",
    )


@pytest.mark.parametrize(
    ("content", "said", "fix"),
    [
        (b"just some text\n", "is not a file written by torch.save", "load only plain state_dict"),
        (None, "is not a state_dict", ""),
    ],
)
def test_a_file_that_is_not_weights(runner, pet, tmp_path, content, said, fix):
    path = tmp_path / "not_weights.pt"
    if content is None:
        torch.save(torch.zeros(3), path)  # a tensor, not a state_dict
    else:
        path.write_bytes(content)
    assert_one_line_error(
        invoke(runner, "eval", "--weights", path, "--set", f"data.root={pet}", "-q"),
        code=4,
        after_notes=True,
        names=["--weights", f"'{path}'", said],
        fix=fix,
    )


def test_a_malicious_pickle_as_weights_runs_nothing(runner, pet, tmp_path, evil_pickle):
    payload, marker = evil_pickle
    path = tmp_path / "evil.pt"
    torch.save({"classifier.6.weight": payload}, path)
    for command in (["eval", "-q"], ["predict", pet / "test", "-q"], ["export"]):
        assert_one_line_error(
            invoke(runner, *command, "--weights", path, "--set", f"data.root={pet}"),
            code=4,
            after_notes=True,
            names=["--weights", f"'{path}'", "pickled code", "posix.system"],
            fix="load only plain state_dict",
        )
    assert not marker.exists()


def test_missing_weights_file(runner, pet):
    assert_one_line_error(
        invoke(runner, "eval", "--weights", "models/none.pt", "--set", f"data.root={pet}"),
        code=4,
        after_notes=True,
        names=["--weights", "'models/none.pt'", "not found"],
        fix="the .pt file that vggft train saved",
    )


def test_written_files_get_normal_permissions(runner, pet):
    assert _train(runner, pet).exit_code == 0
    expected = 0o666 & ~_umask()
    for path in (Path("models/VGG16.pt"), Path("models/VGG16.json"), Path("runs/train/last.pt")):
        assert path.stat().st_mode & 0o777 == expected, path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_missing_data_folder(runner):
    assert_one_line_error(
        invoke(runner, "train", "--set", "data.root=data/nope", "-q"),
        code=3,
        after_notes=True,
        names=["data.root", "'data/nope'", "not found"],
        fix="--set data.root=PATH",
    )


def test_weights_of_another_architecture(runner, pet, tmp_path):
    torch.save(tiny_vgg("vgg11").state_dict(), tmp_path / "vgg11.pth")
    assert_one_line_error(
        _train(runner, pet, "--set", f"model.weights={tmp_path / 'vgg11.pth'}"),
        code=4,
        after_notes=True,
        names=["model.weights", f"'{tmp_path / 'vgg11.pth'}'", "vgg16", "vgg11"],
        fix="set model.arch",
    )
    assert not Path("runs").exists()
