"""Running a teacher over a data source: logits streamed batch by batch, or gathered in a LogitSet.

:func:`iter_logits` is the one loop. It reads batches from the source (a DataLoader with worker
processes when ``workers > 0``, so decoding overlaps the teacher), pins host memory when the
teacher runs on CUDA, checks every batch of logits (shape, NaN/Inf) and hands them back as
float32 CPU tensors, so its memory does not depend on N. :func:`collect_logits` gathers the
stream into a :class:`~calibrate_teacher.logits.LogitSet` with the sample keys filled in.

Both also take what a KD script holds: an ``nn.Module`` or a callable returning logits for the
teacher (:func:`~calibrate_teacher.teachers.as_teacher`) and a DataLoader or any iterable of
batches for the data (:func:`~calibrate_teacher.data.as_source`). A batch whose inputs are a
mapping of named tensors goes to a teacher with several ``input_names`` as it is; a
single-input teacher gets the entry of its name, or the only one. Each teacher moves the inputs
(every tensor of a mapping too) to its own device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from calibrate_teacher.errors import InputError, TeacherError

if TYPE_CHECKING:
    import torch

    from calibrate_teacher.data.base import DataSource
    from calibrate_teacher.logits import LogitSet
    from calibrate_teacher.teachers.base import Inputs, Teacher

__all__ = ["LogitBatch", "collect_logits", "iter_logits"]


@dataclass(frozen=True)
class LogitBatch:
    """The teacher's logits for one batch of samples.

    Attributes:
        indices: int64 positions of the samples in the source ``[n]``.
        logits: float32 CPU logits ``[n, C]``.
        labels: int64 labels ``[n]`` (-1 where a sample has none).
        keys: One stable key per sample.
    """

    indices: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor
    keys: tuple[str, ...]


def iter_logits(
    teacher: Teacher | Callable[..., object],
    source: DataSource | Iterable[object],
    *,
    batch_size: int = 64,
    workers: int = 0,
    indices: Sequence[int] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Iterator[LogitBatch]:
    """Yield the teacher's logits for the source, one batch at a time.

    Args:
        teacher: The teacher to run: a loaded :class:`~calibrate_teacher.teachers.base.Teacher`,
            an ``nn.Module`` or a callable returning logits (run in eval mode, never moved).
        source: The samples (already preprocessed for this teacher): a data source, or an
            iterable of ``(inputs, labels)`` batches or of mappings with ``labels`` (a
            DataLoader), read in its own batches.
        batch_size: Samples per teacher call (data sources; an iterable keeps its batches).
        workers: DataLoader worker processes reading and decoding (0: in this process).
        indices: A subset of sample positions, in the order wanted; None for all.
        progress: Called after each batch with the number of samples just done (skipped
            unreadable samples included, so the count reaches ``len(source)``).

    Yields:
        :class:`LogitBatch` in source order (or ``indices`` order).

    Raises:
        TeacherError: the teacher returns the wrong shape, or NaN/Inf logits (the message
            names the teacher file and the first sample's key).
        InputError: a sample cannot be read (see the source's ``skip_bad``), or a batch of the
            iterable is malformed.
        InvalidValueError: ``teacher`` or ``source`` is of a kind it cannot run or read.
    """
    import torch

    from calibrate_teacher.data import as_source
    from calibrate_teacher.teachers import as_teacher

    teacher, source = as_teacher(teacher), as_source(source)
    pin = str(teacher.device).startswith("cuda")
    skipped: list[tuple[str, str]] | None = getattr(source, "skipped", None)
    seen_skipped = len(skipped) if skipped is not None else 0
    for batch in source.batches(
        batch_size=batch_size, workers=workers, pin_memory=pin, indices=indices
    ):
        inputs = _for_teacher(teacher, batch.inputs)
        with torch.no_grad():  # not inference_mode: its tensors cannot join autograd later
            out = teacher.logits(inputs)
        n = len(batch.keys)
        if out.ndim != 2 or out.shape[0] != n or out.shape[1] != teacher.num_classes:
            raise TeacherError(
                f"{teacher.path}: returned logits of shape {tuple(out.shape)} for a batch of "
                f"{n}; expected [{n}, {teacher.num_classes}]"
            )
        logits = out.detach().to(device="cpu", dtype=torch.float32)
        # One reduction on the fast path; a non-finite sum is either a NaN/Inf logit or (for
        # logits near 3e38) an overflow, told apart by the exact per-row check.
        finite = None if math.isfinite(float(logits.sum())) else torch.isfinite(logits).all(dim=1)
        if finite is not None and not bool(finite.all()):
            rows = (~finite).nonzero().flatten().tolist()
            raise TeacherError(
                f"{teacher.path}: returned NaN or Inf logits for sample {batch.keys[rows[0]]} "
                f"({len(rows)} of {n} in its batch); check the model and its preprocessing"
            )
        if progress is not None:
            done = n
            if skipped is not None:
                done += len(skipped) - seen_skipped
                seen_skipped = len(skipped)
            progress(done)
        yield LogitBatch(
            indices=batch.indices.to(torch.int64),
            logits=logits,
            labels=batch.labels.to(torch.int64),
            keys=batch.keys,
        )


def _for_teacher(teacher: Teacher, inputs: Inputs) -> Inputs:
    """Named inputs as they are for a teacher that takes several; else the one tensor."""
    from calibrate_teacher.teachers.base import single_input, takes_mapping

    if not isinstance(inputs, Mapping) or takes_mapping(teacher):
        return inputs
    names = teacher.input_names
    return single_input(inputs, name=names[0] if names else None, where=teacher.path)


def collect_logits(
    teacher: Teacher | Callable[..., object],
    source: DataSource | Iterable[object],
    *,
    batch_size: int = 64,
    workers: int = 0,
    progress: Callable[[int], None] | None = None,
) -> LogitSet:
    """Run the teacher over the whole source and return its logits with labels and keys.

    Args:
        teacher: The teacher to run: a loaded teacher, an ``nn.Module`` or a callable
            returning logits (see :func:`iter_logits`).
        source: The samples: a data source, or an iterable of batches such as a DataLoader.
        batch_size: Samples per teacher call (data sources; an iterable keeps its batches).
        workers: DataLoader worker processes (0: in this process).
        progress: Called after each batch with the number of samples just done.

    Returns:
        A :class:`~calibrate_teacher.logits.LogitSet` (float32 logits, int64 labels, keys).

    Raises:
        TeacherError: see :func:`iter_logits`.
        InputError: a sample cannot be read, or every sample was skipped.
        InvalidValueError: the labels cannot be calibrated (e.g. samples without a label).
    """
    import torch

    from calibrate_teacher.data import as_source
    from calibrate_teacher.logits import LogitSet

    source = as_source(source)
    logits: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    keys: list[str] = []
    for batch in iter_logits(
        teacher, source, batch_size=batch_size, workers=workers, progress=progress
    ):
        logits.append(batch.logits)
        labels.append(batch.labels)
        keys.extend(batch.keys)
    if not keys:
        if not getattr(source, "skipped", None):
            raise InputError(f"{source.path}: no sample could be read: the data holds no batches")
        raise InputError(
            f"{source.path}: no sample could be read ({len(source)} in the source); "
            "see the skipped list"
        )
    return LogitSet(logits=torch.cat(logits), labels=torch.cat(labels), keys=tuple(keys))
