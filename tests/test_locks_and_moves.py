"""Two commands at once, and moves stopped midway, done for real: a second process holding the lock, a train
killed while it holds one, a Ctrl-C between a move and its record, then --undo."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAST, assert_one_line_error, deadline, invoke, make_image, source_path, tiny_subprocess_env
from test_tune import env, options, read_csv  # noqa: F401  (env: the module-scoped fixture)
from vggft.config.loading import load_config
from vggft.training.train import make_run_folder

needs_flock = pytest.mark.skipif(sys.platform == "win32", reason="no flock on Windows: runs there are not locked")


@needs_flock
def test_a_second_train_on_the_same_weights_is_refused_at_once_and_a_killed_ones_lock_goes_with_it(runner, pet):
    weights = Path("models/VGG16.pt").resolve()
    args = ["train", "--set", f"data.root={pet}", "--set", f"output.weights={weights}", *FAST]
    lock, last = Path(f"{weights}.lock"), Path("runs/train/last.pt")
    first = subprocess.Popen(
        [sys.executable, "-m", "vggft", *args, "--set", "train.epochs=1000"],
        env=tiny_subprocess_env(),  # this test's cache, fake hub and working folder
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with deadline(90):
            while b"pid" not in (lock.read_bytes() if lock.exists() else b""):
                assert not last.exists() and first.poll() is None, "the first run went on without taking a lock"
                time.sleep(0.02)
        os.kill(first.pid, signal.SIGSTOP)  # it holds the lock, paused somewhere in its run
        line = assert_one_line_error(
            invoke(runner, *args),
            code=6,
            names=["output.weights", str(weights), f"pid {first.pid}", str(lock)],
            fix="wait for it to end",
        )
        assert "--set output.weights=PATH" in line
        made = os.listdir("runs") if Path("runs").exists() else []
        assert set(made) <= {"train"} and not weights.exists()  # refused before any work: no run folder of its own
        first.kill()  # SIGKILL: no handler runs, the lock file stays; the OS drops the lock
        first.communicate()
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert lock.exists()
    result = invoke(runner, *args)
    assert result.exit_code == 0, result.output
    assert weights.exists() and not lock.exists()  # taken over and removed at the end


@needs_flock
def test_a_second_move_out_of_the_same_data_is_refused_naming_its_own_option(runner, env, tmp_path):  # noqa: F811
    holder = subprocess.Popen(  # another process moving files out of data.root (the lock alone: no torch import)
        [
            sys.executable,
            "-c",
            "import sys; from vggft.utils.locks import folder_lock\n"
            "with folder_lock(sys.argv[1], 'busy'): print('held', flush=True); sys.stdin.read()",
            str(env.data),
        ],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(source_path())},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        for command, option in (("label-issues", "--move"), ("check-data", "--quarantine")):
            assert_one_line_error(
                invoke(runner, command, *options(env), option, tmp_path / "review"),
                code=6,
                names=[f"{option}:", f"pid {holder.pid}", str(env.data)],
                fix="wait for it to end",
            )
    finally:
        holder.communicate("")
    assert not (tmp_path / "review").exists() and not Path("runs").exists()  # refused before any work


def test_check_data_will_not_quarantine_into_the_data_it_reads(runner, pet):
    line = assert_one_line_error(
        invoke(runner, "check-data", "--set", f"data.root={pet}", "--quarantine", pet / "quarantine", "-q"),
        code=6,
        names=[f"--quarantine {pet / 'quarantine'}", "inside data.root"],
        fix="a folder outside it",
    )
    assert not (pet / "quarantine").exists(), line


def test_a_move_stopped_midway_is_listed_and_undone(runner, env, tmp_path, monkeypatch):  # noqa: F811
    data = tmp_path / "same"
    for name in ("cat", "dog", "owl"):  # one colour for all three: suspects aplenty (moved with --force)
        for i in range(8):
            make_image(data / "train" / name / f"{name}.{i}.jpg", (200, 60, 40), seed=40 * len(name) + i)
    make_image(data / "test" / "cat" / "t.jpg", (200, 60, 40))
    before = sorted(data.rglob("*.jpg"))
    review, out = tmp_path / "review", tmp_path / "out"
    real, moves = shutil.move, []

    def move_then_stop(source, target):  # the third file moves, then Ctrl-C comes before its record says so
        moves.append(real(source, target))
        if len(moves) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "move", move_then_stop)
    options_ = [*options(env, data=data), "--folds", "3", "--out", out]
    stopped = invoke(runner, "label-issues", *options_, "--move", review, "--force")
    monkeypatch.setattr(shutil, "move", real)
    record = out / "moves.csv"
    assert stopped.exit_code == 130, stopped.output
    line = stopped.stderr.strip().splitlines()[-1]
    assert f"3 of {len(read_csv(out / 'label_issues.csv'))} file(s) were moved" in line and str(record) in line
    assert f"vggft label-issues --undo {out}" in line
    rows = read_csv(record)  # every suspect listed before the first move; the third is at its destination
    assert len(rows) == len(read_csv(out / "label_issues.csv")) > 3
    assert [r["status"] for r in rows[:3]] == ["moved", "moved", "planned"] and Path(rows[2]["destination"]).exists()
    assert {r["status"] for r in rows[3:]} == {"planned"} and sorted(review.rglob("*.jpg")) == sorted(
        Path(r["destination"]) for r in rows[:3]
    )

    Path(rows[0]["source"]).write_bytes(b"new")  # its old place taken: nothing is put back
    assert_one_line_error(
        invoke(runner, "label-issues", "--undo", out), code=6, names=["--undo", rows[0]["source"]], fix="aside"
    )
    assert len(list(review.rglob("*.jpg"))) == 3
    Path(rows[0]["source"]).unlink()
    undone = invoke(runner, "label-issues", "--undo", out)
    assert undone.exit_code == 0 and "Put back 3 file(s)" in undone.stdout, undone.output
    assert sorted(data.rglob("*.jpg")) == before and not list(review.rglob("*.jpg"))
    assert [r["status"] for r in read_csv(record)[:3]] == ["restored"] * 3
    again = invoke(runner, "label-issues", "--undo", out)
    assert again.exit_code == 0 and "Nothing to put back" in again.stdout


def test_a_run_folder_name_taken_by_another_run_at_the_same_moment_goes_to_the_next_number(tmp_path, monkeypatch):
    cfg = load_config(None, [f"output.runs_dir={tmp_path / 'runs'}", "output.name=race"])
    real = Path.mkdir

    def taken_first(self, *args, **kwargs):  # another run makes runs/race between this one's look and its mkdir
        if self.name == "race" and not self.exists():
            real(self, *args, **kwargs)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", taken_first)
    assert make_run_folder(cfg) == tmp_path / "runs" / "race2"
