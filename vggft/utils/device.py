"""Choosing the device and the numeric precision."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch

from vggft.utils.errors import DeviceError, OutOfMemoryError


def resolve_device(spec: str) -> torch.device:
    """``auto`` is cuda, then mps, then cpu; asking for an absent device is an error, not a fallback."""
    spec = spec.strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise DeviceError(f"train.device: '{spec}' is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("train.device: cuda was asked for but CUDA is not available here; use auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"train.device: {spec} asked for, but only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("train.device: mps was asked for but is not available here; use auto or cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"train.device: '{spec}' is not supported; use auto, cpu, cuda, cuda:N or mps")
    return device


def autocast_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype for ``train.amp``, or None for fp32.

    auto: bf16 on CUDA that supports it, else fp16; fp32 on CPU and MPS.
    """
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


PRECISION = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def environment_line(command: str, device: torch.device, precision: torch.dtype | None) -> str:
    """A log's header: the command, the versions that decide its numbers, device, precision and threads."""
    import torchvision

    from vggft import __version__

    return (
        f"vggft {__version__} {command}: torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"device {device}, {PRECISION.get(precision, str(precision))}, {torch.get_num_threads()} CPU threads"
    )


def autocast_factory(
    device: torch.device, dtype: torch.dtype | None
) -> Callable[[], contextlib.AbstractContextManager]:
    """A context factory: autocast where asked for, a no-op otherwise."""
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def prepare_backend(device: torch.device) -> None:
    if device.type == "cuda":
        # TF32 matmuls and convolutions on Ampere and later.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def auto_workers(device: torch.device) -> int:
    """DataLoader workers for ``num_workers: auto``.

    On a GPU decoding JPEGs is the bottleneck: use the cores. On a CPU the network
    needs every core and decoding is a percent of the work: a worker would only steal a core.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cuda":
        return max(1, min(cores - 1, 8))
    return 0 if cores <= 4 else min(cores // 4, 4)


def resolve_workers(data, device: torch.device) -> int:
    """``data.num_workers``, with ``auto`` resolved for this device."""
    return auto_workers(device) if data.num_workers == "auto" else data.num_workers


@contextlib.contextmanager
def out_of_memory_hint(device: torch.device, batch_sizes: dict[str, int]):
    """Turn running out of memory (CUDA, MPS or the CPU allocator) into one line naming what to lower."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as err:
        text = str(err)
        if not (isinstance(err, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text):
            raise
        keys = " and ".join(f"{key} {value}" for key, value in batch_sizes.items())
        first = next(iter(batch_sizes))
        half = max(1, batch_sizes[first] // 2)
        example = f"{first} {half}" if first.startswith("--") else f"--set {first}={half}"
        raise OutOfMemoryError(f"out of memory on {device} with {keys}; lower them ({example})") from None
