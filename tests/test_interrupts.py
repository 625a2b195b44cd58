"""Stops that are not errors of the user's (issue 9 and 10): a rank killed under --nproc, Ctrl-C in a sweep or
between extractions, what a killed writer leaves behind; and two refusals that must say the right thing (a
number that overflows, an emoji in a table)."""

from __future__ import annotations

import contextlib
import csv
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed.launcher.api
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

import vggft.features.cache
import vggft.tuning.sweep
from conftest import (
    CLASS_COLOURS,
    FAST,
    assert_error_says,
    assert_one_line_error,
    deadline,
    invoke,
    make_folder,
    make_image,
    tiny_subprocess_env,
)
from test_distributed import _children, _exits, _rank_of
from vggft.cli import _table
from vggft.utils.files import atomic_path
from vggft.utils.text import display_width
from vggft.utils.torchrun import LAUNCHER_ENV, PEER_EXIT

# --- a rank that dies under --nproc ------------------------------------------------------------------


def test_a_killed_rank_is_named_once_with_the_command_that_resumes(tmp_path):
    """SIGKILL rank 1 of `vggft train --nproc 2` as epoch 2 starts: one line names it and how it died, and
    resumes with --nproc; the other rank's view of it (gloo's 'Connection closed by peer … GLHF!') is not said."""
    pet = make_folder(tmp_path / "pet", {"train": {"cat": 6, "dog": 6}, "test": {"cat": 3, "dog": 4}})
    command = [sys.executable, "-m", "vggft", "train", "--nproc", "2", "--set", f"data.root={pet}", *FAST]
    job = subprocess.Popen(
        [*command, "--set", "train.epochs=100000"],
        env=tiny_subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    ranks: dict[int | None, int] = {}
    try:
        with deadline(240):
            said = _kill_rank_1_at_epoch_2(job, ranks)
            assert job.wait() == 1, "".join(said)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
        for pid in ranks.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        job.wait()
    errors = [line for line in said if line.startswith("error")]
    assert errors == [said[-1]], "".join(said)
    assert_error_says(
        said[-1].strip(),
        names=["rank 1 of 2", "died", "killed by signal SIGKILL"],
        fix="go on with: vggft train --resume runs/train/last.pt --nproc 2",
    )
    assert not [line for line in said if re.search(r"GLHF|pair\.cc|Traceback|its error is above", line)], said
    assert Path("runs/train/last.pt").is_file() and _exits(ranks[0], 1)


def _kill_rank_1_at_epoch_2(job: subprocess.Popen, ranks: dict) -> list[str]:
    """What the job says on stderr, rank 1 SIGKILLed when rank 0 says epoch 2 started (``ranks``: their pids)."""
    said: list[str] = []
    assert job.stderr is not None
    for line in job.stderr:
        said.append(line)
        if not ranks and line.startswith("Epoch   2/"):
            ranks.update({_rank_of(pid): pid for pid in _children(job.pid)})
            os.kill(ranks[1], signal.SIGKILL)
    return said


def _launch_raising(monkeypatch, error: Exception) -> None:
    """torch's launcher, as the job it runs ends with ``error`` (what launch_train then says is real)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # launch_train sets it: not for the tests after this one

    def launcher(config, entrypoint):
        def run(*args):
            raise error

        return run

    monkeypatch.setattr(torch.distributed.launcher.api, "elastic_launch", launcher)


def test_ctrl_c_under_nproc_is_said_by_rank_0_alone(runner, pet, monkeypatch):
    """The launcher gets Ctrl-C too (torch raises SignalException there): 130 and not a word of its own
    (no traceback): rank 0's 'Interrupted: … --resume … --nproc 2' is the job's line."""
    _launch_raising(monkeypatch, SignalException("Process 1 got signal: 2", signal.SIGINT))
    result = invoke(runner, "train", "--nproc", "2", "--set", f"data.root={pet}", *FAST)
    assert result.exit_code == 130 and not result.output, result.output


def test_ranks_that_only_lost_touch_are_one_line_with_how_to_go_on(runner, pet, monkeypatch):
    failures = {rank: ProcessFailure(rank, 1000 + rank, PEER_EXIT, "") for rank in (0, 1)}
    _launch_raising(monkeypatch, ChildFailedError("vggft", failures))
    result = invoke(runner, "train", "--nproc", "2", "--set", f"data.root={pet}", *FAST)
    assert_one_line_error(result, code=1, names=["lost touch"], fix="go on with: vggft train --resume")
    assert result.stderr.strip().endswith("--nproc 2")


def test_ctrl_c_and_a_lost_peer_leave_the_job_as_rank_0_says(monkeypatch):
    """In the processes: rank 0's Ctrl-C line gets the --nproc that resumes; the others' Ctrl-C and a rank
    whose peer died under the launcher leave without a word (the launcher says which died)."""
    from vggft.utils.distributed import Group, _leaving
    from vggft.utils.errors import Interrupted, VggftError

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv(LAUNCHER_ENV, "1")
    line = "Interrupted: runs/train/last.pt holds epoch 2; go on with: vggft train --resume runs/train/last.pt"
    said = _leaving(Group(0, 2), Interrupted(line))
    assert isinstance(said, Interrupted) and str(said) == f"{line} --nproc 2"
    quiet = _leaving(Group(1, 2), Interrupted("Interrupted before the first epoch ended; nothing to resume from"))
    assert isinstance(quiet, SystemExit) and quiet.code == 130
    try:
        raise RuntimeError("[../gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:1234 GLHF!")
    except RuntimeError:
        try:
            raise VggftError("another process of this job stopped (…); its error is above") from None
        except VggftError as wrapped:
            peer = _leaving(Group(0, 2), wrapped)
    assert isinstance(peer, SystemExit) and peer.code == PEER_EXIT


# --- sweep -------------------------------------------------------------------------------------------


@pytest.fixture
def colours(tmp_path) -> Path:
    return make_folder(
        tmp_path / "colours", {"train": {"cat": 6, "dog": 6}, "val": {"cat": 2, "dog": 2}, "test": {"cat": 1, "dog": 1}}
    )


def _sweep(runner, colours: Path):
    sets = [f"data.root={colours}", "data.image_size=32", "data.resize=36", "train.epochs=1"]
    return invoke(runner, "sweep", *[a for s in sets for a in ("--set", s)], "--grid", "train.lr=0.1,0.2,0.3")


@pytest.mark.parametrize("where", ["trial 2", "the plot"])
def test_ctrl_c_in_a_sweep_says_what_results_csv_holds_and_how_to_go_on(runner, colours, monkeypatch, where):
    if where == "trial 2":  # during a trial's training
        real, calls = vggft.tuning.sweep.fit_head, []

        def fit_head(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(vggft.tuning.sweep, "fit_head", fit_head)
    else:  # after the trials, drawing sweep.png: today's plain "interrupted"

        def plot(result):
            raise KeyboardInterrupt

        monkeypatch.setattr(vggft.tuning.sweep, "_plot", plot)
    result = _sweep(runner, colours)
    assert result.exit_code == 130 and "Traceback" not in result.output
    said = result.stderr.strip().splitlines()[-1]
    done = 1 if where == "trial 2" else 3
    assert said.startswith(f"Interrupted after {'all 3' if done == 3 else '1 of 3'} trials"), said
    assert "runs/sweep/results.csv holds" in said and re.search(r"best so far trial \d \(train\.lr=0\.\d\)", said)
    assert "run the same vggft sweep command again" in said and "features are cached" in said
    with open("runs/sweep/results.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == done


def test_a_sweep_removes_what_a_killed_one_left_in_its_run_folder(runner, colours, monkeypatch):
    """A sweep killed while writing results.csv leaves atomic_path's temporary folder in a run folder no
    command writes into again: the next sweep removes it (a live writer's it leaves, as atomic_path does)."""
    earlier = Path("runs/sweep")
    earlier.mkdir(parents=True)
    child = os.fork()
    if child == 0:  # a writer killed mid-write (SIGKILL: nothing of its own clean-up runs)
        try:
            with atomic_path(earlier / "results.csv") as tmp:
                tmp.write_text("rank,trial\n")
                os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(1)
    os.waitpid(child, 0)
    left = [p for p in earlier.iterdir() if p.name.startswith(".results.csv.")]
    assert len(left) == 1 and left[0].name.endswith(".tmp") and left[0].is_dir()
    monkeypatch.setattr(vggft.tuning.sweep, "fit_head", _interrupt)
    result = _sweep(runner, colours)
    assert result.exit_code == 130 and "runs/sweep2/results.csv" in result.stderr
    assert not left[0].exists()


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


# --- extraction, config, tables ----------------------------------------------------------------------


def test_ctrl_c_before_the_test_rows_counts_the_train_rows_kept(runner, pet, monkeypatch):
    """Ctrl-C as the test split's extraction starts: train's 12 rows are in the cache, not '0 rows'."""
    real = vggft.features.cache.device_batches

    def device_batches(samples, *args, **kwargs):
        if any("/test/" in path for path, _ in samples):
            raise KeyboardInterrupt  # inside the extraction's loop: device_batches is a generator there
        return real(samples, *args, **kwargs)

    monkeypatch.setattr(vggft.features.cache, "device_batches", lambda *a, **k: _lazy(device_batches, a, k))
    result = invoke(runner, "train", "--set", f"data.root={pet}", *FAST)
    assert result.exit_code == 130
    said = [line for line in result.stderr.splitlines() if "nterrupted" in line]
    assert len(said) == 1 and said[0].startswith("Interrupted during extraction: the 12 rows extracted so far"), said


def _lazy(function, args, kwargs):
    yield from function(*args, **kwargs)


@pytest.mark.parametrize("value", ["1e400", "-1e400"])
def test_a_number_that_overflows_says_so(runner, pet, value):
    result = invoke(runner, "train", "--set", f"data.root={pet}", "--set", f"train.lr={value}")
    assert_one_line_error(result, code=2, names=["train.lr", value], fix="overflows")


def test_an_emoji_class_takes_two_columns_in_the_check_data_table(runner, tmp_path):
    root = tmp_path / "pets"
    for split, count in (("train", 2), ("test", 1)):
        for name, colour in (("🐱", CLASS_COLOURS["cat"]), ("dog", CLASS_COLOURS["dog"])):
            for i in range(count):
                make_image(root / split / name / f"{i}.jpg", colour, seed=10 * count + i)
    result = invoke(runner, "check-data", "--set", f"data.root={root}", "-q")
    table = [line for line in result.stdout.splitlines() if re.match(r"(split|train|test) ", line)]
    assert len(table) == 5, result.stdout
    assert {display_width(line) for line in table} == {len(table[0])}, table  # every line as wide: aligned


def test_tables_pad_wide_characters_by_the_columns_they_take(capsys):
    _table(["class", "n"], [["🐱", "1"], ["dog", "22"], ["猫e\u0301", "3"]], left=1)
    assert capsys.readouterr().out.splitlines() == ["class   n", "🐱      1", "dog    22", "猫e\u0301     3"]
    assert [display_width(t) for t in ("🐱", "猫", "e\u0301", "👨\u200d👩\u200d👧", "❤\ufe0f", "👍🏽")] == [
        2,
        2,
        1,
        2,
        2,
        2,
    ]
