"""torchrun: this process's place in a job, read from the environment without importing torch, and
``vggft train --nproc N``, which starts N training processes on this machine as ``torchrun --standalone`` does."""

from __future__ import annotations

import logging
import os
import sys
import uuid

from vggft.utils.errors import ConfigError, check_option


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

    The processes print their own one-line errors; torch's launcher adds its failure report (and
    its traceback) only with ``--debug``.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    check_nproc(nproc)
    if environment_world() > 1:
        raise ConfigError("--nproc: already running under torchrun; drop --nproc (torchrun starts the processes)")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    if not debug:
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
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
    try:
        elastic_launch(config, sys.executable)(*args)
    except ChildFailedError as err:
        if debug:
            raise
        codes = [failure.exitcode for failure in err.failures.values()]
        return next((code for code in codes if code > 0), 1)
    return 0
