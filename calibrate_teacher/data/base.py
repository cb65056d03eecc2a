"""The one protocol every data source implements."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from calibrate_teacher.teachers.base import Inputs


@dataclass(frozen=True)
class Batch:
    """A batch of teacher inputs with their labels and stable sample keys.

    Attributes:
        inputs: The preprocessed inputs, ready for ``Teacher.logits``: one tensor ``[n, ...]``,
            or a mapping of named tensors (each ``[n, ...]``) for a teacher with several inputs.
        labels: int64 class labels ``[n]`` (-1 where a sample has no label).
        indices: int64 positions of these samples in the source ``[n]``.
        keys: One stable key per sample (a relative path, or the index as text).
    """

    inputs: Inputs
    labels: torch.Tensor
    indices: torch.Tensor
    keys: tuple[str, ...]


@runtime_checkable
class DataSource(Protocol):
    """A finite set of samples that yields preprocessed batches.

    File sources can also read a subset by position (``indices``); an iterable the caller
    holds (a DataLoader) is read in its own order and batching.

    Attributes:
        path: Where the data lives (an in-memory iterable: a label such as ``<DataLoader>``).
        num_classes: The number of classes the labels refer to, where known.
        class_names: The class names in label order, where known.
        description: What the source is, JSON-ready, for reports and manifests.
        skipped: ``(key, reason)`` for each sample skipped as unreadable so far.
    """

    path: Path
    num_classes: int | None
    class_names: tuple[str, ...] | None

    @property
    def description(self) -> Mapping[str, object]:
        """What the source is, JSON-ready (kind, path, preprocessing...)."""
        ...

    @property
    def skipped(self) -> Sequence[tuple[str, str]]:
        """``(key, reason)`` for each sample skipped as unreadable (``skip_bad``)."""
        ...

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
