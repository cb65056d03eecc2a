"""The batching loop every data source shares: a torch DataLoader over chunks of indices.

A source hands over a picklable *reader* whose ``read(indices)`` decodes a whole batch and
returns a :class:`Chunk` (the good samples stacked, plus a reason for each bad one). The
DataLoader's sampler yields lists of indices (``batch_size=None``), so each worker process
decodes whole batches and the batches arrive in sampler order whatever the worker count:
keys and order are the same for 0, 1 or 8 workers. Decode failures travel back as data and
are raised (or recorded as skipped) in the main process, so the error is one clean line
rather than a worker traceback.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from calibrate_teacher.errors import InputError, InvalidValueError

if TYPE_CHECKING:
    import torch

    from calibrate_teacher.data.base import Batch


@dataclass(frozen=True)
class Chunk:
    """One decoded batch as it comes back from a reader (possibly in a worker process)."""

    inputs: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    bad: tuple[tuple[int, str], ...]

    def pin_memory(self) -> Chunk:
        """Return the chunk with its inputs in page-locked memory (DataLoader calls this)."""
        return Chunk(self.inputs.pin_memory(), self.labels, self.indices, self.bad)


class Reader(Protocol):
    """Decodes the samples at some indices; must be picklable for worker processes."""

    def read(self, indices: list[int]) -> Chunk:
        """Return the samples at ``indices`` (in that order), bad ones reported in ``bad``."""
        ...


class _ChunkDataset:
    # A map-style dataset whose items are whole batches: dataset[[3, 4, 5]] -> Chunk.
    def __init__(self, reader: Reader, length: int) -> None:
        self.reader = reader
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, indices: list[int]) -> Chunk:
        return self.reader.read(indices)


def _keep(chunk: Chunk) -> Chunk:
    return chunk


def batch_order(length: int, *, batch_size: int, indices: Sequence[int] | None) -> list[list[int]]:
    """Split ``indices`` (default: all, in order) into lists of at most ``batch_size``.

    Raises:
        InvalidValueError: ``batch_size < 1`` or an index out of range.
    """
    if batch_size < 1:
        raise InvalidValueError(f"batch_size: expected a positive integer, got {batch_size}")
    if indices is None:
        order = list(range(length))
    else:
        order = [int(i) for i in indices]
        bad = next((i for i in order if not 0 <= i < length), None)
        if bad is not None:
            raise InvalidValueError(f"indices: {bad} is out of range for {length} samples")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def iterate(
    reader: Reader,
    length: int,
    *,
    batch_size: int,
    workers: int,
    pin_memory: bool,
    indices: Sequence[int] | None,
    key: Callable[[int], str],
    describe_bad: Callable[[int, str], str],
    skipped: list[tuple[str, str]] | None,
) -> Iterator[Batch]:
    """Yield :class:`Batch` objects read through a DataLoader.

    Args:
        reader: Decodes batches.
        length: Number of samples in the source.
        batch_size: Samples per batch.
        workers: Worker processes (0 reads in this process).
        pin_memory: Pin the inputs (for a CUDA teacher).
        indices: A subset, in the order wanted; None for all, in source order.
        key: The stable key of a sample index.
        describe_bad: The one-line error for a bad sample (index, reason).
        skipped: Where bad samples are recorded as (key, reason); None raises instead.

    Raises:
        InputError: a sample cannot be decoded and ``skipped`` is None.
        InvalidValueError: ``batch_size`` / ``workers`` / ``indices`` out of range.
    """
    from torch.utils.data import DataLoader

    from calibrate_teacher.data.base import Batch

    if workers < 0:
        raise InvalidValueError(f"workers: expected 0 or more, got {workers}")
    plan = batch_order(length, batch_size=batch_size, indices=indices)
    if not plan:
        return
    loader: DataLoader[Chunk] = DataLoader(
        _ChunkDataset(reader, length),  # type: ignore[arg-type]  # any map-style object will do
        batch_size=None,
        sampler=plan,  # a list of index lists is a valid sampler when batch_size=None
        num_workers=workers,
        collate_fn=_keep,  # type: ignore[arg-type]  # with batch_size=None it gets one item
        pin_memory=pin_memory,
        prefetch_factor=4 if workers > 0 else None,
    )
    for chunk in loader:
        for index, reason in chunk.bad:
            if skipped is None:
                raise InputError(describe_bad(index, reason))
            if (key(index), reason) not in skipped:  # a second pass records nothing twice
                skipped.append((key(index), reason))
        if chunk.indices.numel() == 0:
            continue
        keys = tuple(key(int(i)) for i in chunk.indices.tolist())
        yield Batch(inputs=chunk.inputs, labels=chunk.labels, indices=chunk.indices, keys=keys)
