"""Datasets and DataLoaders over lists of (path, label) samples."""

from __future__ import annotations

from collections.abc import Callable, Sequence, Sized

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler

from vggft.data.images import DECODE_ERRORS, open_rgb
from vggft.utils.errors import DataError


class ImageList(Dataset):
    """(image tensor, label) for each (path, label), decoded to upright RGB."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            image = open_rgb(path)
        except DECODE_ERRORS as err:  # changed on disk since it was checked
            raise DataError(f"{path}: cannot be read any more ({err}); run vggft check-data") from None
        return self.transform(image), label


def image_loader(
    samples: Sequence[tuple[str, int]],
    transform,
    batch_size: int,
    *,
    device: torch.device,
    num_workers: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    sampler: Sampler | None = None,
) -> DataLoader:
    return make_loader(
        ImageList(samples, transform),
        batch_size,
        device=device,
        num_workers=num_workers,
        shuffle=shuffle,
        generator=generator,
        sampler=sampler,
    )


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    device: torch.device,
    num_workers: int = 0,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    sampler: Sampler | None = None,
    collate_fn: Callable | None = None,
    repeat: bool = False,
) -> DataLoader:
    """Every sample once per pass (no drop_last: the tutorial's drop_last loses test images).

    ``generator`` drives the shuffle alone: the loader's own seed draw (once per pass, or once in
    all with persistent workers) comes from a private generator, so the order of epoch k is the
    same whether the run started at epoch 1 or resumed there, and the global RNG (dropout) is
    never touched. Workers are capped at the work there is: none for a single batch (the main process
    would only wait for it), never more than there are batches. ``collate_fn``: how a batch is put
    together (None: torch's default, stacked tensors). ``repeat``: read pass after pass (a training
    loop's loaders), so its workers stay between passes until ``stop_workers``; otherwise they stop when
    a pass ends.
    """
    # torch types Dataset and Sampler without __len__: the map-style datasets and the samplers used here have one.
    assert isinstance(dataset, Sized) and (sampler is None or isinstance(sampler, Sized))
    if shuffle and sampler is None:
        sampler = RandomSampler(dataset, generator=generator)
    batches = -(-len(sampler if sampler is not None else dataset) // batch_size)
    num_workers = 0 if batches <= 1 else min(num_workers, batches)
    private = torch.Generator().manual_seed(generator.initial_seed() if generator is not None else 0)
    return (_WorkerLoader if num_workers > 0 else DataLoader)(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        generator=private,
        num_workers=num_workers,
        persistent_workers=repeat and num_workers > 0,
        pin_memory=device.type == "cuda",
        collate_fn=collate_fn,
    )


def stop_workers(*loaders: DataLoader | None) -> None:
    """Stop the workers ``repeat`` loaders keep between passes, now rather than at some later garbage
    collection (which can wait 5 s for each, see _WorkerLoader)."""
    for loader in loaders:
        if isinstance(loader, _WorkerLoader):
            loader.stop()


class _WorkerLoader(DataLoader):
    """A DataLoader whose workers stop as soon as a pass ends early: an error in a worker (DataError) or
    in the loop that reads it (Ctrl-C), or a reader that stops. The next pass starts new workers.

    torch stops them only when its iterator is freed. An error's traceback keeps the iterator alive until
    a later garbage collection, which finds the workers' queues closed and waits 5 s for each worker.
    """

    def __iter__(self):
        passing = super().__iter__()
        try:
            yield from passing
        except BaseException:  # GeneratorExit too: the reader stopped (or unwinds an error of its own)
            self.stop(passing)
            raise

    def stop(self, passing=None) -> None:
        if passing is None:
            passing = getattr(self, "_iterator", None)
        self._iterator = None
        shutdown = getattr(passing, "_shutdown_workers", None)  # torch's own, also run when it is freed
        if shutdown is not None:
            shutdown()
