"""The one protocol every data source implements."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Batch:
    """A batch of teacher inputs with their labels and stable sample keys.

    Attributes:
        inputs: The preprocessed inputs, ready for ``Teacher.logits``.
        labels: int64 class labels ``[n]`` (-1 where a sample has no label).
        indices: int64 positions of these samples in the source ``[n]``.
        keys: One stable key per sample (a relative path, or the index as text).
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    keys: tuple[str, ...]


@runtime_checkable
class DataSource(Protocol):
    """A finite, indexable set of samples that yields preprocessed batches.

    Attributes:
        path: Where the data lives.
        num_classes: The number of classes the labels refer to, where known.
        class_names: The class names in label order, where known.
    """

    path: Path
    num_classes: int | None
    class_names: tuple[str, ...] | None

    def __len__(self) -> int:
        """Return the number of samples."""
        ...

    def batches(
        self,
        *,
        batch_size: int,
        workers: int = 0,
        pin_memory: bool = False,
        indices: Sequence[int] | None = None,
    ) -> Iterator[Batch]:
        """Yield batches in source order (or in the order of ``indices``, a subset)."""
        ...
