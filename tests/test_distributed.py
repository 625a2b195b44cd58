"""Two CPU processes with gloo: one set of outputs, every test image counted once, numbers as one process."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import FAST, assert_error_says, assert_one_line_error, invoke, make_folder, tiny_subprocess_env
from vggft.reporting.metrics import Metrics
from vggft.training.loop import reduce_metrics
from vggft.utils.distributed import SINGLE, Group


def test_shards_hold_every_item_once():
    items = list(range(7))
    shards = [Group(rank, 3).shard(items) for rank in range(3)]
    assert sorted(x for shard in shards for x in shard) == items and [len(s) for s in shards] == [3, 2, 2]
    assert SINGLE.shard(items) == items
    metrics = Metrics.empty(["a", "b"])
    assert reduce_metrics(metrics, SINGLE) is metrics  # one process: nothing to sum


def test_two_processes_train_like_one(runner, tmp_path):
    # 7 test images over 2 ranks (4 + 3) and 3 val images (2 + 1): uneven shards on purpose.
    pet = make_folder(
        tmp_path / "pet", {"train": {"cat": 6, "dog": 6}, "val": {"cat": 1, "dog": 2}, "test": {"cat": 3, "dog": 4}}
    )
    env = tiny_subprocess_env()
    result = subprocess.run(
        [sys.executable, "-m", "vggft", "train", "--nproc", "2", "--set", f"data.root={pet}", *FAST],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
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
    assert_one_line_error(result, code=2, names=["--set", "unknown key 'train.epocs'"], fix="'train.epochs'")


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            if entry.isdigit() and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _rank_of(pid: int) -> int | None:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next((int(item[5:]) for item in environ if item.startswith(b"RANK=")), None)


class _StalledJob:
    """A two-process training job whose rank 1 is SIGSTOPped as epoch 2 starts (before that: every setup
    wait is past). It runs in the background from the start of this module, so the seconds it waits for
    the stopped rank pass while the other tests here run."""

    def __init__(self, folder: Path, torch_home: Path):
        pet = make_folder(folder / "pet", {"train": {"cat": 6, "dog": 6}, "test": {"cat": 3, "dog": 4}})
        env = {
            **tiny_subprocess_env(),
            "VGGFT_DIST_TIMEOUT": "5",
            "TORCH_HOME": str(torch_home),
            "VGGFT_CACHE": str(folder / "cache"),
        }
        command = [
            sys.executable,
            "-m",
            "vggft",
            "train",
            "--nproc",
            "2",
            "--set",
            f"data.root={pet}",
            *FAST,
            "--set",
            "train.epochs=100000",
        ]
        self.job = subprocess.Popen(
            command,
            env=env,
            cwd=folder,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.said: list[str] = []
        self.ranks: dict[int, int] = {}
        self.noticed: float | None = None  # seconds from the stop to the error line
        self.done = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        stopped_at = None
        try:
            for line in self.job.stderr:
                self.said.append(line)
                if stopped_at is None and line.startswith("Epoch   2/"):
                    self.ranks = {_rank_of(pid): pid for pid in _children(self.job.pid)}
                    stopped_at = time.monotonic()
                    os.kill(self.ranks[1], signal.SIGSTOP)
                elif stopped_at is not None and line.startswith("error"):
                    self.noticed = time.monotonic() - stopped_at
                    break
        finally:  # a failure here (no rank 1 found) ends the wait too; the test then shows what was said
            self.done.set()

    def end(self) -> None:
        if self.job.returncode is not None:
            return  # ended already (the test, then the module's teardown): its pids may be another's now
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.job.pid, signal.SIGKILL)  # only this job: its own session
        for pid in self.ranks.values():  # the launcher may have put its workers in sessions of their own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # a stopped process too: it would outlive the tests otherwise
        self.job.wait()


@pytest.fixture(scope="module", autouse=True)
def stalled_job(tmp_path_factory, fake_hub):
    job = _StalledJob(tmp_path_factory.mktemp("stalled"), fake_hub)
    yield job
    job.end()


def test_a_stopped_rank_is_named_in_one_line_within_seconds(stalled_job):
    """SIGSTOP one of two training processes: the other gives up after VGGFT_DIST_TIMEOUT, says which rank
    stopped answering, and exits (torchrun's agent then kills the stopped one, after its 30 s grace)."""
    assert stalled_job.done.wait(240), "".join(stalled_job.said)
    assert stalled_job.noticed is not None, "".join(stalled_job.said)
    assert _exits(stalled_job.ranks[0], 20)
    stalled_job.end()
    said = stalled_job.said
    # The last line names the rank that stopped and the wait that ended it (VGGFT_DIST_TIMEOUT's 5 s, not the 30 s
    # after which torchrun's agent would have ended the job anyway), and how to wait longer.
    assert_error_says(said[-1].strip(), names=["rank 1 of 2", "did not answer for 5s"], fix="raise VGGFT_DIST_TIMEOUT")
    assert not [line for line in said if "Traceback" in line]


def _exits(pid: int, seconds: float) -> bool:
    """Whether ``pid`` ends (is gone, or a zombie its parent has not reaped yet) within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.2)
    return False
