"""Any iterable of batches as a data source: the DataLoader a KD script already has.

Each item the iterable yields is one batch, in either shape:

* ``(inputs, labels)`` (a tuple or list of two, as ``TensorDataset`` and torchvision datasets
  give through a DataLoader), ``inputs`` a tensor or a mapping of named tensors;
* a mapping with a ``labels`` key (a Hugging Face collator's batch): every other key is a named
  input.

Labels are class indices ``[n]`` (-1 for none), moved to the CPU; inputs stay where the
iterable puts them (the teacher moves them to its device). Keys are the running sample index as
text. The batches are read as they come, in the iterable's own order and batching (its
``batch_size``, ``num_workers`` and ``pin_memory`` apply; ours are not used), and only the
current batch is held: the source never copies the data set.

``len()`` is the number of samples: counted on a full pass once one has run; before that, a
DataLoader's sampler gives it, or the labels of a list of batches. Any other iterable (a
generator, an ``IterableDataset``) has a length only once it has been read; a one-shot iterator
can be read once.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from calibrate_teacher.errors import InputError, InvalidValueError

if TYPE_CHECKING:
    import torch

    from calibrate_teacher.data.base import Batch
    from calibrate_teacher.teachers.base import Inputs

__all__ = ["IterableSource"]

_SHAPES = "expected (inputs, labels) pairs or mappings with a 'labels' key"


class IterableSource:
    """A :class:`~calibrate_teacher.data.base.DataSource` over an iterable of batches.

    Attributes:
        data: The iterable, as given.
        path: A label for messages, such as ``<DataLoader>``.
        num_classes: The number of class names given, else None.
        class_names: The class names given, else None.
        description: What the source is, for reports.
        skipped: Always empty; kept for symmetry with image folders.
    """

    def __init__(
        self,
        data: Iterable[object],
        *,
        class_names: Sequence[str] | None = None,
        name: str | None = None,
    ) -> None:
        """Wrap ``data``; nothing is read until :meth:`batches`.

        Raises:
            InvalidValueError: ``data`` is not iterable, or is a string or a path.
        """
        if isinstance(data, str | bytes | Path) or not isinstance(data, Iterable):
            raise InvalidValueError(
                f"data: got {type(data).__name__}; expected a data path, or an iterable of "
                "(inputs, labels) batches such as a DataLoader"
            )
        self.data = data
        self.path = Path(name) if name is not None else Path(f"<{type(data).__name__}>")
        self.class_names: tuple[str, ...] | None = tuple(class_names) if class_names else None
        self.num_classes: int | None = len(self.class_names) if self.class_names else None
        self.skipped: list[tuple[str, str]] = []
        self._one_shot = isinstance(data, Iterator)  # a generator: not iter() here, which starts workers
        self._started = False
        self._count: int | None = None

    @property
    def description(self) -> dict[str, object]:
        """JSON-ready: kind, type, sample count where known, batch size where the loader has one."""
        return {
            "kind": "iterable",
            "type": type(self.data).__name__,
            "num_samples": self.length_hint(),
            "batch_size": getattr(self.data, "batch_size", None),
            "num_classes": self.num_classes,
            "classes": list(self.class_names) if self.class_names else None,
            "preprocess": None,
            "preprocess_from": "none: the iterable's batches are fed as they come",
        }

    def __len__(self) -> int:
        """Return the number of samples (see :meth:`length_hint`).

        Raises:
            InvalidValueError: the length cannot be known before the data has been read.
        """
        known = self.length_hint()
        if known is None:
            raise InvalidValueError(
                f"{self.path}: its number of samples is known only once it has been read; "
                "read it first (collect_logits), or pass a DataLoader or a list"
            )
        return known

    def length_hint(self) -> int | None:
        """The number of samples where it is known without reading the data, else None.

        In order: the count of a full pass that has run; a DataLoader's sampler length; the
        labels of a list or tuple of batches (already in memory, so nothing is decoded).
        """
        if self._count is not None:
            return self._count
        known = self._sampler_length()
        if known is None and isinstance(self.data, Sequence):
            known = sum(len(_split(item, number, self.path)[1]) for number, item in enumerate(self.data))
        return known

    def _sampler_length(self) -> int | None:
        # A DataLoader batching a sized sampler knows its sample count without reading a batch.
        from torch.utils.data import BatchSampler, DataLoader

        if not isinstance(self.data, DataLoader):
            return None
        batching = self.data.batch_sampler
        if not isinstance(batching, BatchSampler):
            return None
        try:
            n = len(batching.sampler)  # type: ignore[arg-type]
        except TypeError:  # an IterableDataset's sampler has no length
            return None
        return n // batching.batch_size * batching.batch_size if batching.drop_last else n

    def _items(self) -> Iterator[tuple[Inputs, torch.Tensor]]:
        if self._one_shot and self._started:
            raise InputError(
                f"{self.path}: a one-shot iterator, already read; pass a list or a DataLoader "
                "to read the data more than once"
            )
        self._started = True
        for number, item in enumerate(self.data):
            yield _split(item, number, self.path)

    def batches(
        self,
        *,
        batch_size: int = 0,
        workers: int = 0,
        pin_memory: bool = False,
        indices: Sequence[int] | None = None,
    ) -> Iterator[Batch]:
        """Yield the iterable's batches as :class:`~calibrate_teacher.data.base.Batch` objects.

        Args:
            batch_size: Not used: the iterable's own batches are kept.
            workers: Must be 0: set ``num_workers`` on the DataLoader itself.
            pin_memory: Not used: set ``pin_memory`` on the DataLoader itself.
            indices: An ascending subset of sample positions to keep; None for all.

        Raises:
            InputError: a batch of another shape, labels that are not class indices, inputs
                whose first dimension is not the batch's, or a one-shot iterator read twice.
            InvalidValueError: ``workers > 0``, or ``indices`` not ascending.
        """
        if workers:
            raise InvalidValueError(
                f"workers: {self.path} yields its own batches; set num_workers on the DataLoader "
                "and leave workers at 0"
            )
        wanted = None if indices is None else [int(i) for i in indices]
        if wanted is not None and any(b <= a for a, b in itertools.pairwise(wanted)):
            raise InvalidValueError(
                f"indices: {self.path} is read in order, so a subset must be ascending"
            )
        return self._batches(wanted)

    def _batches(self, wanted: list[int] | None) -> Iterator[Batch]:
        import torch

        from calibrate_teacher.data.base import Batch

        start = 0
        keep = set(wanted) if wanted is not None else None
        for inputs, labels in self._items():
            n = len(labels)
            index = torch.arange(start, start + n, dtype=torch.int64)
            start += n
            if keep is not None:
                rows = [i for i, position in enumerate(index.tolist()) if position in keep]
                if not rows:
                    continue
                if len(rows) < n:
                    inputs, labels, index = _rows(inputs, rows), labels[rows], index[rows]
            keys = tuple(str(i) for i in index.tolist())
            yield Batch(inputs=inputs, labels=labels, indices=index, keys=keys)
        self._count = start


def _rows(inputs: Inputs, rows: list[int]) -> Inputs:
    if isinstance(inputs, Mapping):
        return {k: v[rows] for k, v in inputs.items()}
    return inputs[rows]


def _split(item: object, number: int, where: Path) -> tuple[Inputs, torch.Tensor]:
    """``(inputs, labels)`` of one yielded batch, checked; labels int64 on the CPU."""
    import torch

    if isinstance(item, Mapping):
        if "labels" not in item:
            keys = ", ".join(map(str, item)) or "none"
            raise InputError(f"{where}: batch {number} is a mapping without 'labels' ({keys}); {_SHAPES}")
        raw_labels = item["labels"]
        raw_inputs: object = {k: v for k, v in item.items() if k != "labels"}
        if not raw_inputs:
            raise InputError(f"{where}: batch {number} holds labels but no inputs; {_SHAPES}")
    elif isinstance(item, tuple | list) and len(item) == 2:
        raw_inputs, raw_labels = item
    else:
        size = f" of {len(item)}" if isinstance(item, tuple | list) else ""
        raise InputError(f"{where}: batch {number} is a {type(item).__name__}{size}; {_SHAPES}")
    labels = _tensor(raw_labels, f"batch {number} labels", where)
    if labels.ndim != 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise InputError(
            f"{where}: batch {number} labels are {labels.dtype} {tuple(labels.shape)}; expected "
            "class indices [n] (int, -1 for none), not one-hot or soft labels"
        )
    n = int(labels.shape[0])
    inputs: Inputs
    if isinstance(raw_inputs, Mapping):
        inputs = {str(k): _tensor(v, f"batch {number} input {k!r}", where) for k, v in raw_inputs.items()}
        named = inputs.items()
    else:
        inputs = _tensor(raw_inputs, f"batch {number} inputs", where)
        named = {"inputs": inputs}.items()
    for name, value in named:
        if value.ndim == 0 or value.shape[0] != n:
            raise InputError(
                f"{where}: batch {number} {name} have shape {tuple(value.shape)} for {n} labels; "
                "every input needs one row per label"
            )
    return inputs, labels.detach().to("cpu", torch.int64)


def _tensor(value: object, what: str, where: Path) -> torch.Tensor:
    """A tensor as it is; a numpy array or a list of numbers as a tensor."""
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray | list):
        try:
            return torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InputError(f"{where}: {what} cannot become a tensor ({exc})") from exc
    raise InputError(f"{where}: {what} is a {type(value).__name__}, not a tensor; {_SHAPES}")
