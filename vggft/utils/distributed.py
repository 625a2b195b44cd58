"""Running under torchrun: who this process is, talking to the others, and the shards each one takes.

``torchrun --nproc-per-node N -m vggft train …`` (or ``vggft train --nproc N``) starts N copies of
the same command; torchrun tells each its place through RANK, WORLD_SIZE and LOCAL_RANK. Without
them everything here is a no-op and vggft runs as one process.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from vggft.utils.errors import ConfigError, DeviceError, Interrupted, VggftError, first_line
from vggft.utils.torchrun import LAUNCHER_ENV, PEER_EXIT, environment_rank, environment_world

TIMEOUT_ENV = "VGGFT_DIST_TIMEOUT"  # seconds a process waits for the others before the job fails
DEFAULT_TIMEOUT = 300.0  # a stopped or hung process is named within minutes, not an hour
SETUP_FACTOR = 12  # around data preparation and extraction one rank may legitimately work alone longer
RESUME = "vggft train --resume "  # how a Ctrl-C line ends that says how to go on
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")


@dataclass(frozen=True)
class Group:
    """This process's place in the job: rank ``rank`` of ``world``, on ``local_rank``'s device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    side: dist.ProcessGroup | None = field(default=None, compare=False, repr=False)  # gloo, for barriers and check-ins

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence) -> list:
        """Every world-th item from this rank's: the shards together hold each item exactly once."""
        return list(items[self.rank :: self.world])

    def barrier(self) -> None:
        """Wait for every rank, as long as data preparation or extraction may take (SETUP_FACTOR x the
        timeout); a rank that does not come is named."""
        if self.active:
            check_in(self, SETUP_FACTOR * _timeout().total_seconds(), "preparing data or extracting features")

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) in place; on CPU for gloo, on the rank's GPU for nccl."""
        if self.active:
            backend_device = torch.device("cuda", torch.cuda.current_device()) if _backend() == "nccl" else None
            work = tensor.to(backend_device) if backend_device is not None else tensor
            dist.all_reduce(work)
            if work is not tensor:
                tensor.copy_(work.cpu())
        return tensor


SINGLE = Group()


@contextlib.contextmanager
def main_first(group: Group) -> Iterator[None]:
    """Rank 0 runs the block first (it decodes images and writes the shared caches); then the others run
    it, finding rank 0's results. Without a job this is a plain block."""
    if group.active and not group.is_main:
        group.barrier()
    yield
    if group.active and group.is_main:
        group.barrier()


def _backend() -> str:
    return dist.get_backend() if dist.is_initialized() else ""


def _timeout() -> datetime.timedelta:
    text = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT))
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < 10**8:
        raise ConfigError(f"{TIMEOUT_ENV}: expected seconds (more than 0), got '{text}'")
    return datetime.timedelta(seconds=seconds)


class StalledError(VggftError):
    """Another process of the job stopped answering (stopped, hung, swapping or unreachable)."""

    rank_specific = True  # said by whichever rank noticed: rank 0 may be the one that stalled


def check_in(group: Group, seconds: float, doing: str) -> None:
    """Every rank reports to rank 0 within ``seconds``; the ranks that do not are named in a StalledError."""
    try:
        dist.monitored_barrier(group=group.side, timeout=datetime.timedelta(seconds=seconds), wait_all_ranks=True)
    except RuntimeError as err:
        text = str(err)
        if any(marker in text for marker in PEER_GONE) or not ("monitoredBarrier" in text or is_timeout(err)):
            raise  # another process died: its own error says why (see vggft.train.fit)
        raise StalledError(_stalled_line(group, text, seconds, doing)) from None


def _stalled_line(group: Group, text: str, seconds: float, doing: str) -> str:
    found = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", text)
    if found:
        ranks = [int(r) for r in re.findall(r"\d+", found[1])]
    else:  # a rank other than 0 learns only that rank 0 did not answer
        ranks = [0]
    who = ", ".join(str(r) for r in ranks)
    base = _timeout().total_seconds()
    factor = "" if seconds == base else f", and {seconds / base:g} times that here"
    return (
        f"rank{'s' if len(ranks) > 1 else ''} {who} of {group.world} did not answer for {seconds:g}s while "
        f"{doing} (stopped, hung or unreachable); the job stops. If that much time can be normal here, "
        f"raise {TIMEOUT_ENV} (now {base:g}s{factor})"
    )


def is_timeout(err: BaseException) -> bool:
    """A collective gave up waiting for another process (gloo and nccl say it differently)."""
    text = str(err)
    return any(marker in text for marker in ("Timed out waiting", "timed out", "operation timeout", "wait timeout"))


def stalled(group: Group, err: BaseException) -> StalledError:
    """After a training collective timed out: every rank checks in once more, and those that do not are named."""
    try:
        check_in(group, _timeout().total_seconds(), "training")
    except StalledError as stall:
        return stall
    return StalledError(
        f"a collective timed out after {_timeout().total_seconds():g}s ({first_line(err)}) but "
        f"every rank answered since; raise {TIMEOUT_ENV} if a step can take that long"
    )


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[tuple[Group, torch.device]]:
    """Join the job torchrun started (nccl on CUDA, gloo on CPU) and pick this rank's device; leave it after.

    Rank 0 speaks for the job: Ctrl-C is said by it alone, with the ``--nproc`` that resumes the run; under
    ``vggft train --nproc`` a rank whose collective broke because another died leaves without a word
    (``PEER_EXIT``), and the launcher names the one that died."""
    world = environment_world()
    if world <= 1:
        yield SINGLE, device
        return
    group = Group(environment_rank(), world, int(os.environ.get("LOCAL_RANK", "0") or 0))
    device, backend = _rank_device(group, device)
    try:
        dist.init_process_group(backend, timeout=_timeout())
        side = dist.new_group(backend="gloo")
        assert isinstance(side, dist.ProcessGroup), "a group of every rank has this one as a member"
        group = Group(group.rank, group.world, group.local_rank, side)
    except RuntimeError as err:
        if not is_timeout(err):
            raise
        raise StalledError(
            f"not every process of the job ({group.world}) joined within "
            f"{_timeout().total_seconds():g}s (one is stopped, hung or unreachable); the job stops. "
            f"If starting can take that long here, raise {TIMEOUT_ENV}"
        ) from None
    try:
        yield group, device
    except (KeyboardInterrupt, VggftError) as err:
        instead = _leaving(group, err)
        if instead is err:
            raise
        raise instead from None
    finally:
        dist.destroy_process_group()


def _rank_device(group: Group, device: torch.device) -> tuple[torch.device, str]:
    """This rank's device and the backend for it."""
    if device.type == "cpu":
        return device, "gloo"
    if device.type != "cuda":
        raise DeviceError(f"train.device: {device.type} cannot run distributed; use cuda or cpu")
    if group.local_rank >= torch.cuda.device_count():
        err = DeviceError(
            f"train.device: local rank {group.local_rank} needs a GPU but this node has "
            f"{torch.cuda.device_count()}; start at most that many processes per node"
        )
        err.rank_specific = True  # rank 0 has a GPU and would not say it
        raise err
    device = torch.device("cuda", group.local_rank)
    torch.cuda.set_device(device)
    return device, "nccl"


def _leaving(group: Group, err: BaseException) -> BaseException:
    """What leaves the job instead of ``err``: Ctrl-C's line on rank 0 with the ``--nproc`` that resumes,
    and a quiet exit where another rank or the launcher says it (the error itself otherwise)."""
    if isinstance(err, (KeyboardInterrupt, Interrupted)):
        if not group.is_main:
            return SystemExit(Interrupted.exit_code)  # rank 0 says what is kept and how to go on
        return Interrupted(_with_nproc(str(err), group)) if isinstance(err, Interrupted) else err
    peer = type(err) is VggftError and err.__context__ is not None and is_peer_failure(err.__context__)
    if peer and os.environ.get(LAUNCHER_ENV):
        return SystemExit(PEER_EXIT)  # the launcher names the process that died (vggft.utils.torchrun)
    return err


def _with_nproc(message: str, group: Group) -> str:
    """A resume command at the end of ``message`` with the ``--nproc`` of this job (one node: several
    nodes resume with their own launcher's command)."""
    one_node = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0) == group.world
    if one_node and message.rpartition(RESUME)[1] and "--nproc" not in message.rpartition(RESUME)[2]:
        return f"{message} --nproc {group.world}"
    return message


def is_peer_failure(err: BaseException) -> bool:
    """A collective broke because another process of the job died (its own error is reported there)."""
    return isinstance(err, dist.DistBackendError) or any(marker in str(err) for marker in PEER_GONE)
