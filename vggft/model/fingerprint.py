"""Content hashes of a network's tensors: what ties a checkpoint of the trainable part to the frozen rest it
was trained on, and names the feature cache's folder."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from vggft.model.build import frozen_prefix_layers


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """A content hash of named tensors (names, shapes, dtypes and bytes)."""
    digest = hashlib.sha1()
    for name, tensor in tensors.items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


# Frozen fingerprints made of the prefix's and the rest's start with this; older ones (vggft-checkpoint/2
# files written before it) are one hash over every frozen tensor, and are still checked as such.
FROZEN_SCHEME = "2:"


def frozen_fingerprint(model: nn.Module, trainable: dict[str, torch.Tensor], prefix_weights: str | None = None) -> str:
    """The fingerprint of everything a checkpoint does not hold: what is rebuilt from model.weights.

    It joins the ``fingerprint`` of the frozen prefix's state_dict (``prefix_weights``: the feature cache
    hashes the same tensors to name its folder, so a run hashes them once) and that of the frozen tensors
    after it; a tensor of the prefix that a two-stage run trains later is in the prefix's part.
    """
    layers = frozen_prefix_layers(model)
    if prefix_weights is None:
        prefix_weights = fingerprint(nn.Sequential(*[m for _, m in layers]).state_dict())
    inside = {f"{name}.{key}" for name, module in layers for key in module.state_dict()}
    rest = fingerprint({k: v for k, v in model.state_dict().items() if k not in trainable and k not in inside})
    return FROZEN_SCHEME + hashlib.sha1(f"{prefix_weights}|{rest}".encode()).hexdigest()


def legacy_frozen_fingerprint(model: nn.Module, trainable: dict[str, torch.Tensor]) -> str:
    """A frozen fingerprint as recorded before ``FROZEN_SCHEME``: one hash over every frozen tensor."""
    return fingerprint({k: v for k, v in model.state_dict().items() if k not in trainable})
