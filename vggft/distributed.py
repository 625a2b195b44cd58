"""Running under torchrun: who this process is, talking to the others, and the shards each one takes.

``torchrun --nproc-per-node N -m vggft train …`` (or ``vggft train --nproc N``) starts N copies of
the same command; torchrun tells each its place through RANK, WORLD_SIZE and LOCAL_RANK. Without
them everything here is a no-op and vggft runs as one process.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .env import environment_rank, environment_world
from .errors import ConfigError, DeviceError
from .metrics import Metrics

TIMEOUT_ENV = "VGGFT_DIST_TIMEOUT"  # seconds a collective may wait before the job fails (default 3600)


@dataclass(frozen=True)
class Group:
    """This process's place in the job: rank ``rank`` of ``world``, on ``local_rank``'s device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

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
        if self.active:
            dist.barrier()

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
    text = os.environ.get(TIMEOUT_ENV, "3600")
    try:
        seconds = float(text)
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV}: expected seconds, got '{text}'") from None
    return datetime.timedelta(seconds=seconds)


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[tuple[Group, torch.device]]:
    """Join the job torchrun started (nccl on CUDA, gloo on CPU) and pick this rank's device; leave it after."""
    world = environment_world()
    if world <= 1:
        yield SINGLE, device
        return
    group = Group(environment_rank(), world, int(os.environ.get("LOCAL_RANK", "0") or 0))
    if device.type == "cuda":
        if group.local_rank >= torch.cuda.device_count():
            err = DeviceError(f"train.device: local rank {group.local_rank} needs a GPU but this node has "
                              f"{torch.cuda.device_count()}; start at most that many processes per node")
            err.rank_specific = True  # rank 0 has a GPU and would not say it
            raise err
        device = torch.device("cuda", group.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise DeviceError(f"train.device: {device.type} cannot run distributed; use cuda or cpu")
    dist.init_process_group(backend, timeout=_timeout())
    try:
        yield group, device
    finally:
        dist.destroy_process_group()


def is_peer_failure(err: BaseException) -> bool:
    """A collective broke because another process of the job died (its own error is reported there)."""
    text = str(err)
    return isinstance(err, dist.DistBackendError) or any(
        marker in text for marker in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                      "NCCL communicator was aborted")
    )


def reduce_metrics(metrics: Metrics, group: Group) -> Metrics:
    """Sum each rank's counts: the result is the metrics of the whole split, as one process would get."""
    if not group.active:
        return metrics
    ks = sorted(metrics.topk_correct)
    counts = torch.cat([metrics.confusion.flatten(), torch.tensor([metrics.topk_correct[k] for k in ks])])
    group.sum_(counts)
    loss = group.sum_(torch.tensor([metrics.loss_sum], dtype=torch.float64))
    n = metrics.confusion.numel()
    metrics.confusion = counts[:n].view_as(metrics.confusion).clone()
    metrics.topk_correct = {k: int(v) for k, v in zip(ks, counts[n:])}
    metrics.loss_sum = float(loss)
    return metrics
