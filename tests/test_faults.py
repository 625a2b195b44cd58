"""Faults done for real: processes killed at a rename (strace -e inject), full and read-only file systems
(small tmpfs mounts), damaged and foreign cache shards, values that overflow, refused resumes.

Each test here fails on the code issue 12 was filed against.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import vggft.training.train
import vggft.utils.files
from conftest import FAST, assert_one_line_error, invoke, make_folder, tiny_subprocess_env
from test_safety import _train

STRACE = shutil.which("strace")
# The listing run stops only at the traced calls (seccomp-bpf, which strace applies with -f): plain ptrace
# stops at every syscall and made it three times slower. The killed run needs plain ptrace (its KILL
# injection is not delivered under seccomp-bpf), so strace attaches to it only once it has imported
# what it needs, and traces its main thread, which writes every file of a unit (curves.png comes from a
# thread of its own): the listing counts the main thread's renames too.
STRACE_FAST = ("-f", "--seccomp-bpf")
RENAMES = "rename,renameat,renameat2"
# A vggft process that imports its modules, says so, and runs once it reads "go" (nothing else: a test that
# failed before and left it behind makes it exit).
PRIMED = (
    "import runpy, sys, torch, torchvision, vggft.cli, vggft.training.train, vggft.diagnostics.evaluation; "
    "import vggft.reporting.plots; "
    "print('ready', flush=True); sys.stdin.readline() == 'go\\n' or sys.exit(3); sys.argv[0] = 'vggft'; "
    "runpy.run_module('vggft', run_name='__main__')"
)


# --- tools: kill at the Nth rename, mount a small file system ------------------------------------


def _vggft(*args: str) -> list[str]:
    return [sys.executable, "-m", "vggft", *args]


def _env(cache: Path) -> dict[str, str]:
    return {**tiny_subprocess_env(), "VGGFT_CACHE": str(cache)}


def _renames(command: list[str], env: dict[str, str], trace: Path) -> list[str]:
    """Run ``command`` under strace; the targets of the renames its main thread made, in order (the
    thread that writes every file, and the one ``_Primed.kill_at`` counts)."""
    done = subprocess.run(
        [STRACE, *STRACE_FAST, "-qq", "-o", str(trace), "-e", f"trace=execve,{RENAMES}", *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    calls = [line.split(None, 1) for line in trace.read_text().splitlines()]  # -f puts the thread id first
    main = next(tid for tid, call in calls if call.startswith("execve("))
    return [
        re.findall(r'"([^"]*)"', call)[1]
        for tid, call in calls
        if tid == main and call.startswith("rename") and call.endswith("= 0")
    ]


class _Primed:
    """A vggft process started now, its imports done untraced (in parallel with whatever the test does
    next); ``kill_at`` then traces it and lets it run."""

    def __init__(self, command: list[str], env: dict[str, str]):
        assert command[:3] == [sys.executable, "-m", "vggft"]
        self.process = subprocess.Popen(
            [sys.executable, "-c", PRIMED, *command[3:]],
            env=env,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def kill_at(self, n: int) -> str:
        """Attach strace, let the process run, SIGKILL it at its ``n``-th rename (before the rename
        happens); its stderr."""
        assert self.process.stdout.readline() == "ready\n", self.process.communicate()
        inject = f"inject={RENAMES}:error=EIO:signal=KILL:when={n}"
        pid = self.process.pid
        with subprocess.Popen(
            [STRACE, "-qq", "-o", "/dev/null", "-e", f"trace={RENAMES}", "-e", inject, "-p", str(pid)],
            stderr=subprocess.PIPE,
            text=True,
        ) as tracer:
            status, deadline = Path(f"/proc/{pid}/status"), time.monotonic() + 30
            while f"TracerPid:\t{tracer.pid}\n" not in status.read_text():
                if tracer.poll() is not None:  # ptrace refused (kernel.yama.ptrace_scope, not root)
                    pytest.skip(f"strace cannot attach to a running process here: {tracer.stderr.read().strip()}")
                assert time.monotonic() < deadline, "strace did not attach within 30 s"
                time.sleep(0.01)
            time.sleep(0.1)  # strace has stopped the process once and now traces its every syscall
            _, stderr = self.process.communicate("go\n", timeout=120)
        assert self.process.returncode == -signal.SIGKILL, (self.process.returncode, stderr)
        return stderr

    def end(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate()


@pytest.fixture
def primed():
    """primed(command, env) -> a _Primed process; whatever is left of it is killed after the test."""
    made: list[_Primed] = []

    def make(command: list[str], env: dict[str, str]) -> _Primed:
        made.append(_Primed(command, env))
        return made[-1]

    yield make
    for process in made:
        process.end()


def _index(targets: list[str], wanted, count: int = 1) -> int:
    """The 1-based position of the ``count``-th rename whose target satisfies ``wanted``."""
    hits = [i for i, target in enumerate(targets, start=1) if wanted(target)]
    return hits[count - 1]


needs_strace = pytest.mark.skipif(STRACE is None, reason="strace is not installed")


@pytest.fixture
def mount(tmp_path):
    """mount(name, size, read_only=False) -> a fresh tmpfs folder; unmounted after the test."""
    mounted = []

    def make(name: str, size: str, read_only: bool = False) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
        mounted.append(folder)
        return folder

    yield make
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _remount_read_only(folder: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)


def _fill(folder: Path, leave: int) -> None:
    """Fill the file system of ``folder`` until ``leave`` bytes are free (as another process would)."""
    with open(folder / "ballast", "ab") as handle:
        handle.write(b"\1" * (shutil.disk_usage(folder).free - leave))
    assert shutil.disk_usage(folder).free == leave


CHECK_DISK = vggft.training.train._check_disk


def _fill_after_the_check(monkeypatch, folder: Path, leave: int) -> None:
    """The free-space check runs for real and passes; then the disk fills up, as when several runs
    share a disk and each passed its own check."""

    def check_then_fill(*args):
        CHECK_DISK(*args)
        _fill(folder, leave)

    monkeypatch.setattr(vggft.training.train, "_check_disk", check_then_fill)


def _temporaries(*folders: Path) -> list[str]:
    return sorted(p.name for folder in folders for p in folder.rglob(f"*{vggft.utils.files.TEMP_SUFFIX}"))


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _load(path) -> dict:
    return torch.load(path, weights_only=True)


# --- killed between two files that belong together ------------------------------------------------

SCORED = [
    "--set",
    "data.image_size=32",
    "--set",
    "data.resize=36",
    "--set",
    "train.epochs=3",
    "--set",
    "train.lr=5",
    "--set",
    "model.dropout=0",
    "--quiet",
]  # val acc 25%, 75%, 25%: best is epoch 2


@needs_strace
def test_killed_between_best_pt_and_last_pt_resumes_what_last_pt_says(runner, tmp_path, monkeypatch, primed):
    """Killed at the second checkpoint rename of epoch 2 (whichever order they come in): the resumed run
    ends exactly as the run that was never killed, and best.pt agrees with last.pt."""
    pet = make_folder(
        tmp_path / "pet", {"train": {"cat": 6, "dog": 6}, "val": {"cat": 3, "dog": 1}, "test": {"cat": 2, "dog": 2}}
    )
    train = ["train", "--set", f"data.root={pet}", *SCORED]
    killed = primed(_vggft(*train, "--set", "output.weights=resumed.pt"), _env(tmp_path / "c2"))
    targets = _renames(
        _vggft(*train, "--set", "output.runs_dir=ref", "--set", "output.weights=ref.pt"),
        _env(tmp_path / "c1"),
        tmp_path / "trace",
    )
    reference = _load("ref/train/last.pt")
    assert [row["epoch"] for row in reference["history"]] == [1, 2, 3] and reference["best"]["epoch"] == 2
    checkpoint = re.compile(r"/(last|best)\.pt$")
    n = _index(targets, checkpoint.search, count=4)  # epoch 1: two; epoch 2 (an improvement): two
    killed.kill_at(n)
    assert not Path("resumed.pt").exists() and len(_temporaries(Path("runs/train"))) == 1

    monkeypatch.setenv("VGGFT_CACHE", str(tmp_path / "c2"))
    result = invoke(runner, "train", "--resume", "runs/train/last.pt", "-q")
    assert result.exit_code == 0, result.output
    assert "Restored the best epoch (2, val acc 75.00%)" in result.stderr
    last, best = _load("runs/train/last.pt"), _load("runs/train/best.pt")
    assert last["best"]["epoch"] == best["epoch"] == 2 and _same_tensors(best["model"], last["best_model"])
    assert _same_tensors(_load("resumed.pt"), _load("ref.pt"))  # what is tested and saved: epoch 2's head
    assert _temporaries(Path("runs/train")) == []  # the killed writer's, removed by the next


def _cat_owl(tmp_path) -> Path:
    """Two classes as in the pet folder, but not the same two: old labels would name them wrongly."""
    return make_folder(tmp_path / "cat_owl", {"train": {"cat": 6, "owl": 6}, "test": {"cat": 2, "owl": 2}})


def _killed_writer(path: Path) -> None:
    """A real process killed while it writes ``path`` through vggft's atomic writer."""
    pid = os.fork()
    if pid == 0:  # the child: half a file in its temporary folder, then SIGKILL
        with vggft.utils.files.atomic_path(path) as tmp:
            tmp.write_bytes(b"half a shard")
            os.kill(os.getpid(), signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


@needs_strace
def test_killed_between_weights_and_sidecar_is_caught_never_mislabelled(runner, pet, tmp_path, monkeypatch, primed):
    """An earlier run's sidecar beside a killed run's weights: refused. The killed writers' temporaries
    (beside the weights, in the cache) are removed by the next run; a live writer's never."""
    other = _cat_owl(tmp_path)
    # Another seed: other weights for sure (at lr 1e-4 one epoch can leave the tiny head bit-identical).
    killed = primed(
        _vggft("train", "--set", f"data.root={other}", *FAST, "--set", "train.epochs=1", "--set", "train.seed=1"),
        _env(tmp_path / "c2"),
    )
    command = _vggft("train", "--set", f"data.root={pet}", *FAST, "--set", "train.epochs=1")
    targets = _renames(command, _env(tmp_path / "c1"), tmp_path / "trace")  # the earlier run: cat, dog
    killed.kill_at(_index(targets, lambda target: target.endswith("models/VGG16.json")))
    for command in (["eval", "-q"], ["predict", other / "test", "-q"]):
        assert_one_line_error(
            invoke(runner, *command),
            code=4,
            after_notes=True,
            names=["models/VGG16.json", "other weights", "'models/VGG16.pt'"],
            fix="delete the sidecar",
        )

    shards = next((tmp_path / "c1").glob("features/*"))
    _killed_writer(shards / "123-456.pt")
    assert len(_temporaries(shards)) == 1 and len(_temporaries(Path("models"))) == 1
    with subprocess.Popen(["sleep", "60"]) as alive:
        live = Path("models") / f".VGG16.pt.{vggft.utils.files._HOST}-{alive.pid}.abcd1234.tmp"
        live.mkdir()
        (live / "VGG16.pt").write_bytes(b"a save in progress")
        monkeypatch.setenv("VGGFT_CACHE", str(tmp_path / "c1"))
        result = _train(runner, other, "--set", "train.epochs=1")  # rows c1 lacks: a shard in its folder
        alive.kill()
    assert result.exit_code == 0, result.output
    assert _temporaries(shards) == [] and _temporaries(Path("models")) == [live.name]
    assert (live / "VGG16.pt").read_bytes() == b"a save in progress"


# --- full and read-only disks ---------------------------------------------------------------------


def test_disk_full_at_the_weights_is_one_line_and_keeps_the_earlier_pair(runner, pet, mount, monkeypatch):
    disk = mount("disk", "512k")
    weights = disk / "VGG16.pt"
    assert _train(runner, pet, "--set", f"output.weights={weights}").exit_code == 0
    before = {path: path.read_bytes() for path in (weights, weights.with_suffix(".json"))}
    _fill_after_the_check(monkeypatch, disk, leave=0)
    assert_one_line_error(
        _train(runner, pet, "--set", f"output.weights={weights}", "--set", "train.lr=0.5"),
        code=6,
        after_notes=True,
        names=[str(weights), "disk full"],
        fix="free some space",
    )
    assert {path: path.read_bytes() for path in before} == before and _temporaries(disk) == []


def test_disk_full_at_a_checkpoint_is_one_line(runner, pet, mount, monkeypatch):
    """torch.save's own writer meets the full disk: '[enforce fail at inline_container.cc] unexpected pos'."""
    disk = mount("runs", "1m")
    _fill_after_the_check(monkeypatch, disk, leave=12 << 10)  # config.yaml and best.pt fit, last.pt does not
    assert_one_line_error(
        _train(runner, pet, "--set", f"output.runs_dir={disk}"),
        code=6,
        after_notes=True,
        names=[f"{disk}/train/last.pt", "disk full"],
        fix="free some space",
    )
    assert (disk / "train" / "best.pt").is_file() and _temporaries(disk) == []
    assert not Path("models").exists()


def _said(result, words: str) -> list[str]:
    return [line for line in result.stderr.splitlines() if words in line]


def test_disk_full_at_the_cache_is_one_note_and_the_run_goes_on(runner, pet, mount, monkeypatch):
    disk = mount("cache", "1m")
    _fill_after_the_check(monkeypatch, disk, leave=0)
    result = _train(runner, pet, "--set", f"cache.dir={disk}")
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    (unsaved,) = _said(result, "rows not saved")
    assert "disk full" in unsaved and result.stdout.startswith("Test: acc@1")
    monkeypatch.setattr(vggft.training.train, "_check_disk", CHECK_DISK)
    (disk / "ballast").unlink()
    result = _train(runner, pet, "--set", f"cache.dir={disk}")  # nothing was kept: extracted again, and saved
    assert result.exit_code == 0 and _said(result, "Extracting train features: 12 images")
    assert not _said(result, "not saved") and _temporaries(disk) == []


def test_read_only_cache_dir(runner, pet, mount):
    cold = mount("cold", "1m", read_only=True)
    result = _train(runner, pet, "--set", f"cache.dir={cold}")
    assert result.exit_code == 0 and "Traceback" not in result.output and result.stdout.startswith("Test: acc@1")
    (unsaved,) = _said(result, "rows not saved")
    assert "Read-only file system" in unsaved
    # A warm cache mounted read-only is read as it is: nothing extracted, nothing to say.
    warm = mount("warm", "1m")
    assert _train(runner, pet, "--set", f"cache.dir={warm}").exit_code == 0
    _remount_read_only(warm)
    result = _train(runner, pet, "--set", f"cache.dir={warm}")
    assert result.exit_code == 0 and not _said(result, "images in") and not _said(result, "not saved")


# --- the feature cache: rows of the wrong width, other data's shards --------------------------------


def _shards(cache: Path) -> list[Path]:
    return sorted(cache.glob("features/*/*.pt"))


def test_a_shard_of_the_wrong_width_is_discarded_and_extracted_again(runner, pet):
    assert _train(runner, pet).exit_code == 0
    cache = Path(os.environ["VGGFT_CACHE"])
    shard = _shards(cache)[0]
    keys = _load(shard)["keys"]
    torch.save({"keys": keys, "features": torch.rand(len(keys), 100)}, shard)  # the right keys, 100-wide rows
    result = _train(runner, pet)
    assert result.exit_code == 0, result.output
    (discarded,) = _said(result, "discarding damaged shard")
    assert f"{shard} (rows 100 wide where this model takes 32)" in discarded
    assert _said(result, f"features: {len(keys)} images")  # those rows again, and only those
    result = _train(runner, pet)
    assert result.exit_code == 0 and not _said(result, "images in")  # the replacement is good


def test_a_run_reads_only_the_shards_holding_its_rows(runner, pet, tmp_path, monkeypatch):
    other = _cat_owl(tmp_path)
    assert _train(runner, other).exit_code == 0
    cache = Path(os.environ["VGGFT_CACHE"])
    foreign = set(_shards(cache))
    assert len(foreign) == 2  # train, test
    real, loaded = torch.load, []
    monkeypatch.setattr(torch, "load", lambda f, *a, **kw: loaded.append(Path(f)) or real(f, *a, **kw))
    assert _train(runner, pet).exit_code == 0
    assert not foreign & set(loaded)
    loaded.clear()
    assert _train(runner, other, "--set", "train.lr=0.01").exit_code == 0
    assert {path for path in loaded if path.suffix == ".pt" and "features" in path.parts} == foreign
    # Shards from before the index (no .keys beside them) are read once, and indexed.
    for index in cache.glob("features/*/*.keys"):
        index.unlink()
    result = _train(runner, pet)
    assert result.exit_code == 0 and not _said(result, "images in")
    assert len(list(cache.glob("features/*/*.keys"))) == 4


# --- values and requests refused before any work -------------------------------------------------


def test_resume_from_best_pt_is_refused_and_touches_nothing(runner, pet):
    assert _train(runner, pet).exit_code == 0
    run = Path("runs/train")
    before = {name: (run / name).read_bytes() for name in ("last.pt", "metrics.csv", "best.pt")}
    assert_one_line_error(
        invoke(runner, "train", "--resume", run / "best.pt", "-q"),
        code=4,
        after_notes=True,
        names=["--resume", "'runs/train/best.pt'", "best epoch"],
        fix="runs/train/last.pt",
    )
    assert {name: (run / name).read_bytes() for name in before} == before


def test_resume_with_another_head_is_refused(runner, pet):
    assert _train(runner, pet).exit_code == 0
    assert_one_line_error(
        invoke(runner, "train", "--resume", "runs/train/last.pt", "--set", "model.head=gap"),
        code=2,
        after_notes=True,
        names=["--set model.head", "when resuming"],
        fix="start a new run",
    )


def test_weights_named_like_their_sidecar_are_refused_before_any_work(runner, pet):
    assert_one_line_error(
        _train(runner, pet, "--set", "output.weights=models/net.json"),
        code=6,
        after_notes=True,
        names=["output.weights", "'models/net.json'", "sidecar"],
        fix="a .pt name",
    )
    assert not Path("models").exists() and not Path("runs").exists()


def test_a_run_name_too_long_for_the_file_system_is_refused_before_any_work(runner, pet):
    assert_one_line_error(
        _train(runner, pet, "--name", "n" * 300),
        code=6,
        after_notes=True,
        names=["output.name", "--name", "'nnnn", "300 bytes"],
        fix="choose a shorter one",
    )
    assert not Path("runs").exists() and not Path(os.environ["VGGFT_CACHE"]).exists()


@pytest.mark.parametrize("seed", ["1.0e+20", "100000000000000000000", "-1"])
def test_a_seed_out_of_range_is_refused(runner, pet, seed):
    assert_one_line_error(
        _train(runner, pet, "--set", f"train.seed={seed}"),
        code=2,
        after_notes=True,
        names=["--set", "train.seed"],
        fix="a whole number from 0 to 9223372036854775807",
    )


def test_exploding_momentum_stops_at_the_first_non_finite_loss_and_keeps_the_last_good_epoch(runner, pet):
    """Momentum 1e10: epoch 1 ends with huge but finite numbers, epoch 2 reaches NaN."""
    assert_one_line_error(
        _train(runner, pet, "--set", "train.momentum=1e10", "--set", "train.epochs=3"),
        code=8,
        after_notes=True,
        names=["nan", "epoch 2/3", "runs/train/last.pt"],
        fix="lower train.lr",
    )
    last = _load("runs/train/last.pt")
    assert last["epoch"] == 1 and all(torch.isfinite(t).all() for t in last["model"].values())
    assert not Path("models/VGG16.pt").exists() and Path("runs/train/curves.png").is_file()  # the good epochs drawn


def test_save_torch_returns_the_digest_of_the_very_bytes_it_wrote(tmp_path):
    """Hashed from the temporary file before the rename; the file itself is what torch.save writes under that name."""
    import hashlib

    obj = {"weight": torch.arange(12.0).reshape(3, 4)}
    digest = vggft.utils.files.save_torch(obj, tmp_path / "atomic" / "w.pt", sha256=True)
    torch.save(obj, tmp_path / "w.pt")  # a direct write under the same file name
    written = (tmp_path / "atomic" / "w.pt").read_bytes()
    assert written == (tmp_path / "w.pt").read_bytes()
    assert digest == hashlib.sha256(written).hexdigest()
    assert vggft.utils.files.save_torch(obj, tmp_path / "w2.pt") is None
