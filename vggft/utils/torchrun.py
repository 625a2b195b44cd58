"""torchrun: this process's place in a job, read from the environment without importing torch, and
``vggft train --nproc N``, which starts N training processes on this machine as ``torchrun --standalone`` does."""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
import uuid
from pathlib import Path

from vggft.utils.errors import ConfigError, Interrupted, VggftError, check_option

LAUNCHER_ENV = "VGGFT_LAUNCHER"  # set in the processes ``vggft train --nproc`` starts: it names one that dies
PEER_EXIT = 86  # the exit code of a process that left because another died: the launcher says which and how


def environment_rank() -> int:
    """RANK as torchrun sets it (0 when not under torchrun): only rank 0 speaks to the user."""
    return int(os.environ.get("RANK", "0") or 0)


def environment_world() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not under torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def check_nproc(nproc: int) -> None:
    """``--nproc``: here, not in ``config.options``, because the launcher sits below the config stage."""
    check_option(nproc >= 1, "--nproc", "1 or more processes", nproc)


def launch_train(nproc: int, train_args: list[str], *, debug: bool = False) -> int:
    """Run ``vggft train train_args`` in ``nproc`` processes; return 0, or the exit code of a failed one.

    The processes print their own one-line errors. One that dies without a word (killed by a signal) is named
    here, with the command that resumes the run; the others leave without a word (``PEER_EXIT``) rather than
    say what their collective saw. torch's launcher adds its failure report (and traceback) only with ``--debug``.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    check_nproc(nproc)
    if environment_world() > 1:
        raise ConfigError("--nproc: already running under torchrun; drop --nproc (torchrun starts the processes)")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    if not debug:
        _quiet_launcher_logs()
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.5,
    )
    args = ["-m", "vggft", *(["--debug"] if debug else []), "train", *train_args]
    started, before = time.time(), os.environ.get(LAUNCHER_ENV)
    os.environ[LAUNCHER_ENV] = "1"  # the processes inherit it
    try:
        elastic_launch(config, sys.executable)(*args)
    except ChildFailedError as err:
        if debug:
            raise
        return _child_failed(list(err.failures.items()), nproc, train_args, started)
    except SignalException as err:
        if debug:
            raise
        return _launcher_signalled(signal.Signals(err.sigval), nproc, train_args, started)
    finally:
        if before is None:
            os.environ.pop(LAUNCHER_ENV, None)
        else:
            os.environ[LAUNCHER_ENV] = before
    return 0


def _quiet_launcher_logs() -> None:
    """torch's launcher logs its failure report and shutdown warnings; each of its modules' loggers has a
    level of its own, so each is raised (the processes' own lines and the launcher's below say it all)."""
    names = [name for name in logging.root.manager.loggerDict if name.startswith("torch.distributed")]
    for name in ["torch.distributed.elastic", *names]:
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _child_failed(failures: list, nproc: int, train_args: list[str], started: float) -> int:
    """The exit code of a job whose processes failed (``failures``: (rank, ProcessFailure), the first to fail
    first); the one line that names a process that died without a word of its own, and how to go on."""
    causes = [(rank, failure.exitcode) for rank, failure in failures if failure.exitcode != PEER_EXIT]
    if not causes:
        go_on = _go_on(nproc, train_args, started)
        raise VggftError(f"the processes of this job lost touch with each other; the job stops; {go_on}")
    rank, code = causes[0]
    if code > 0 and not (rank and code == Interrupted.exit_code):
        return code  # the process said why on its own line (rank 0 says Ctrl-C for the job)
    go_on = _go_on(nproc, train_args, started)
    if code < 0:
        how = f"killed by signal {_signal_name(-code)}"
        raise VggftError(f"rank {rank} of {nproc} died ({how}); the job stops; {go_on}")
    raise Interrupted(f"Interrupted: rank {rank} of {nproc} got Ctrl-C (SIGINT); the job stops; {go_on}")


def _launcher_signalled(sigval: signal.Signals, nproc: int, train_args: list[str], started: float) -> int:
    """Ctrl-C: the processes got it too, and rank 0 says what is kept (130); another signal is said here."""
    if sigval == signal.SIGINT:
        return Interrupted.exit_code
    go_on = _go_on(nproc, train_args, started)
    raise Interrupted(f"Stopped by {sigval.name}: the job's {nproc} processes are stopped; {go_on}")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _go_on(nproc: int, train_args: list[str], started: float) -> str:
    """How to go on: the command that resumes the run this job wrote (its last.pt)."""
    last = _last_checkpoint(train_args, started)
    if last is None:  # no epoch ended, or the run folder is not where it is looked for
        return f"if an epoch ended, go on with: vggft train --resume <its run folder>/last.pt --nproc {nproc}"
    return f"go on with: vggft train --resume {last} --nproc {nproc}"


def _last_checkpoint(train_args: list[str], started: float) -> Path | None:
    """The last.pt of the run this job trained: the resumed one's, or the newest written since ``started`` in a
    run folder under the working folder or under an ``output.runs_dir`` set on the command line (the config is
    a stage above this one: a runs_dir that only the config file sets elsewhere is not found)."""
    resume = _values(train_args, "--resume")
    if resume:
        last = Path(resume[-1]).parent / "last.pt"
        return last if last.is_file() else None
    sets = [value.partition("=") for value in _values(train_args, "--set")]
    places = [Path(value.strip()) for key, _, value in sets if key.strip() == "output.runs_dir"]
    found = [*Path().glob("*/*/last.pt"), *(last for place in places for last in place.glob("*/last.pt"))]
    written = [(mtime, last) for last in found if (mtime := _mtime(last)) >= started - 1]
    return max(written)[1] if written else None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return -math.inf


def _values(args: list[str], flag: str) -> list[str]:
    """The values of ``flag`` in ``args``, as ``vggft train`` passes them on (``--flag value``, and ``--quiet``)."""
    found, i = [], 0
    while i < len(args) - 1:
        if args[i] == "--quiet":
            i += 1
            continue
        if args[i] == flag:
            found.append(args[i + 1])
        i += 2
    return found
