"""What the environment says about this process, read without importing torch: torchrun's place in a job."""

from __future__ import annotations

import os


def environment_rank() -> int:
    """RANK as torchrun sets it (0 when not under torchrun): only rank 0 speaks to the user."""
    return int(os.environ.get("RANK", "0") or 0)


def environment_world() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not under torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)
