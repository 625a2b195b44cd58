"""Training steps shared between heads fitted one after another on the same rows (a sweep's trials).

A classifier6 head's leading layers train nothing: dropout, the frozen ``Linear(4096, 4096)`` and its ReLU,
dropout again. Each step they stream 64 MB of frozen weights for a batch of 4 rows, most of a step's time.
Trials that share the seed and the batch size meet, step by step, the same rows and the same random state,
so those layers compute the same output in every trial. ``SharedSteps`` keeps each step's output from the
first trial; a later step that finds the same input rows and the same random state takes it, and the random
state the layers left, instead of running them again. What it hands out is what the layers would have
computed, bit for bit (a trial whose steps differ simply misses and computes). At most ``budget`` bytes are
kept; past that, steps run as usual.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

BUDGET = 1 << 30  # bytes of kept steps (input rows, output, random states), on the device the head trains on
DEVICES = ("cpu", "cuda")  # whose random state is saved and restored (an MPS head fits on its own)


@dataclass
class _Step:
    rows: torch.Tensor
    state_before: list[torch.Tensor]
    state_after: list[torch.Tensor]
    output: torch.Tensor


class SharedSteps:
    """The kept steps of one head's leading layers (``front`` of ``share``), for heads copied from ``suffix``."""

    def __init__(self, suffix: nn.Sequential, budget: int = BUDGET):
        self.suffix = suffix
        self.budget = budget
        self.kept: list[_Step] = []
        self.bytes = 0
        self.signature: tuple[str, ...] | None = None
        self.taken = self.computed = 0

    def share(self, head: nn.Sequential) -> nn.Sequential:
        """``head`` (a copy of ``suffix``, as ``loop.fresh_head`` makes) running its leading layers through
        this cache in training mode; the same modules under the same names, so its state_dict is head's."""
        front = _front_length(head)
        signature = tuple(repr(module) for module in list(head)[:front])
        device = next(head.parameters()).device
        if front == 0 or device.type not in DEVICES or (self.signature is not None and signature != self.signature):
            return head
        self.signature = signature
        return _SharingHead(head, front, self)

    def run(self, step: int, rows: torch.Tensor, layers: list[nn.Module]) -> torch.Tensor:
        before = _random_state(rows.device)
        if step < len(self.kept):
            kept = self.kept[step]
            if kept.rows.shape == rows.shape and _same(kept.state_before, before) and torch.equal(kept.rows, rows):
                _set_random_state(rows.device, kept.state_after)
                self.taken += 1
                return kept.output.clone()  # the layers after may work in place (ReLU(inplace=True))
        output = _through(layers, rows)
        self.computed += 1
        if step == len(self.kept):
            kept = _Step(rows.detach().clone(), before, _random_state(rows.device), output.detach().clone())
            size = sum(
                t.numel() * t.element_size() for t in (kept.rows, kept.output, *kept.state_before, *kept.state_after)
            )
            if self.bytes + size <= self.budget:
                self.kept.append(kept)
                self.bytes += size
        return output


class _SharingHead(nn.Sequential):
    def __init__(self, head: nn.Sequential, front: int, cache: SharedSteps):
        super().__init__(*head)
        self.front, self.cache, self.steps = front, cache, 0

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(rows)
        step, self.steps = self.steps, self.steps + 1
        layers = list(self)
        return _through(layers[self.front :], self.cache.run(step, rows, layers[: self.front]))


def _through(layers: list[nn.Module], rows: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        rows = layer(rows)
    return rows


def _front_length(head: nn.Sequential) -> int:
    """How many leading layers have nothing to train."""
    count = 0
    for module in head:
        if any(p.requires_grad for p in module.parameters()) or isinstance(module, nn.modules.batchnorm._BatchNorm):
            break
        count += 1
    return count


def _random_state(device: torch.device) -> list[torch.Tensor]:
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def _set_random_state(device: torch.device, states: list[torch.Tensor]) -> None:
    torch.set_rng_state(states[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(states[1], device)


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
