"""Cached rows in sample order without a second copy of them.

The feature cache holds each row as a view into a shard (memory-mapped from disk, or the tensor just
extracted). Stacking every row of a split into one tensor doubled the memory a data set needs (16 KB an
image for classifier6: 32 GB at two million images instead of 16). ``Rows`` keeps the views and gathers
a batch only when one is asked for: ``RowDataset`` hands a DataLoader the rows of each batch, as a
``TensorDataset`` would.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset


class Rows:
    """Indexable like a 2-D float tensor of rows: ``rows[i]`` is row i (a view, no copy); ``rows[index]``
    with a slice, list or index tensor gathers those rows into a new tensor; ``take`` selects rows
    without copying; ``tensor()`` makes the one full copy for code that needs a real tensor."""

    def __init__(self, items: Sequence[torch.Tensor], width: int | None = None):
        self.items = list(items)
        self.width = width if width is not None else (int(self.items[0].shape[0]) if self.items else 0)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.items), self.width))

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return 2

    @property
    def dtype(self) -> torch.dtype:
        return self.items[0].dtype if self.items else torch.float32

    def __getitem__(self, index):
        if isinstance(index, int) or (isinstance(index, torch.Tensor) and index.dim() == 0):
            return self.items[int(index)]
        return self._stack(self._select(index))

    def take(self, index) -> Rows:
        """The rows at ``index`` (a slice, a list or a 1-D index tensor), still without a copy."""
        return Rows(self._select(index), self.width)

    def tensor(self) -> torch.Tensor:
        return self._stack(self.items)

    def _select(self, index) -> list[torch.Tensor]:
        if isinstance(index, slice):
            return self.items[index]
        if isinstance(index, torch.Tensor):
            if index.dtype == torch.bool:
                index = index.nonzero().flatten()
            index = index.tolist()
        return [self.items[i] for i in index]

    def _stack(self, items: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(items) if items else torch.empty(0, self.width)

    def __repr__(self) -> str:
        return f"Rows({len(self.items)} x {self.width}, {self.dtype})"


class RowDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """``TensorDataset(rows, labels)`` for rows that may be a ``Rows``: item i is (row i, label i), so a
    DataLoader gathers only the rows of the batch it asks for."""

    def __init__(self, rows: Rows | torch.Tensor, labels: torch.Tensor):
        if rows.size(0) != labels.size(0):
            raise AssertionError("Size mismatch between tensors")  # TensorDataset's check and message
        self.rows, self.labels = rows, labels

    def __getitem__(self, index):
        return self.rows[index], self.labels[index]

    def __len__(self) -> int:
        return self.labels.size(0)
