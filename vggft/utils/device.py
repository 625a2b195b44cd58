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


CPU_BF16_ENV = "VGGFT_CPU_BF16"  # 0: treat this CPU as lacking native bf16 (the tests pin it); 1: as having it
# oneDNN's ISA caps ($ONEDNN_MAX_CPU_ISA) that still hold its bf16 kernels; a lower cap emulates bf16, 5-30x slower
# than fp32 (docs/performance.md), whatever the CPU has.
ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_AMX", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16")


def cpu_bf16() -> str | None:
    """The unit this CPU computes bf16 on natively ('AMX' or 'AVX512-BF16'), asked of torch and oneDNN; None
    where it has neither (bf16 would be emulated, slower than fp32), or torch cannot say.

    $VGGFT_CPU_BF16 overrides the probe: 0 says none, 1 says one (tests force either path on any CPU).
    """
    override = os.environ.get(CPU_BF16_ENV, "").strip()
    if override in ("0", "1"):
        return f"{CPU_BF16_ENV}={override}" if override == "1" else None
    if not torch.backends.mkldnn.is_available() or _onednn_cap_below_bf16():
        return None
    for name, probe in (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported")):
        check = getattr(torch.cpu, probe, None)  # private helpers of torch.cpu (2.x); absent: not known
        try:
            if check is not None and check():
                return name
        except Exception:  # a probe that fails says nothing: fp32, the safe side
            continue
    return None


def _onednn_cap_below_bf16() -> str | None:
    """``NAME=ISA`` where $ONEDNN_MAX_CPU_ISA (or the older $DNNL_MAX_CPU_ISA) holds oneDNN below its bf16 kernels."""
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        cap = os.environ.get(name, "").strip().upper()
        if cap:
            return None if cap in ("ALL", "DEFAULT", *ONEDNN_BF16_ISAS) else f"{name}={cap}"
    return None


def autocast_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype for ``train.amp``, or None for fp32.

    auto: bf16 on CUDA that supports it, else fp16; bf16 on a CPU that computes it natively (``cpu_bf16``),
    else fp32; fp32 on MPS. off: fp32, exactly as without autocast.
    """
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_bf16() is not None:
        return torch.bfloat16
    return None


PRECISION = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def precision_reason(device: torch.device, precision: torch.dtype | None) -> str:
    """Why ``precision`` was chosen on ``device``, in a few words (the log header says it)."""
    if device.type == "mps" and precision is None:
        return "train.amp: auto is fp32 on MPS"
    if device.type != "cpu":
        return "train.amp: off" if precision is None else f"{device.type} autocast"
    unit = cpu_bf16()
    if precision is None and os.environ.get(CPU_BF16_ENV, "").strip() == "0":
        return f"{CPU_BF16_ENV}=0"
    if precision is None and unit is None and (cap := _onednn_cap_below_bf16()):
        return f"{cap} holds oneDNN below its bf16 kernels"
    if precision is None:
        return "train.amp: off" if unit else "this CPU has no native bf16 (neither AMX nor AVX512-BF16)"
    if precision == torch.bfloat16:
        return f"native bf16 on this CPU: {unit}" if unit else "train.amp: bf16, emulated on this CPU (slow)"
    return "train.amp: fp16"


def environment_line(command: str, device: torch.device, precision: torch.dtype | None) -> str:
    """A log's header: the command, the versions that decide its numbers, device, precision (and why) and
    threads."""
    import torchvision

    from vggft import __version__

    name = PRECISION.get(precision, str(precision))
    return (
        f"vggft {__version__} {command}: torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"device {device}, {name} ({precision_reason(device, precision)}), {torch.get_num_threads()} CPU threads"
    )


def extraction_layout(device: torch.device, precision: torch.dtype | None) -> torch.memory_format:
    """The memory format the frozen prefix and its input batches are kept in for feature extraction.

    channels_last: oneDNN's blocked convolutions take it without a reorder per layer, bf16 and fp32 alike
    (scripts/bench_bf16.py measures both layouts in each precision; docs/performance.md has the table).
    """
    return torch.channels_last


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
