"""Running a teacher over a data source: logits streamed batch by batch, or gathered in a LogitSet.

:func:`iter_logits` is the one loop. It reads batches from the source (a DataLoader with worker
processes when ``workers > 0``, so decoding overlaps the teacher), pins host memory when the
teacher runs on CUDA, checks every batch of logits (shape, NaN/Inf) and hands them back as
float32 CPU tensors, so its memory does not depend on N. :func:`collect_logits` gathers the
stream into a :class:`~calibrate_teacher.logits.LogitSet` with the sample keys filled in.

Both also take what a KD script holds: an ``nn.Module`` or a callable returning logits for the
teacher (:func:`~calibrate_teacher.teachers.as_teacher`) and a DataLoader or any iterable of
batches for the data (:func:`~calibrate_teacher.data.as_source`). A batch whose inputs are a
mapping of named tensors goes to a teacher with several ``input_names`` as it is (the teacher
picks its inputs by name and casts them to the dtypes it declares; see
:mod:`~calibrate_teacher.teachers._inputs`); a single-input teacher gets the entry of its name,
or the only one. ``input_map`` renames fields first (``--input NAME=FIELD``). Each teacher moves
the inputs (every tensor of a mapping too) to its own device.
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

__all__ = ["LogitBatch", "collect_logits", "feed_teacher", "first_inputs", "iter_logits"]


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
    input_map: Mapping[str, str] | None = None,
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
        input_map: ``{model_input: batch_field}`` for inputs whose field is named otherwise
            (``--input NAME=FIELD``; :func:`~calibrate_teacher.teachers._inputs.parse_input_map`).

    Yields:
        :class:`LogitBatch` in source order (or ``indices`` order).

    Raises:
        TeacherError: the teacher returns the wrong shape, or NaN/Inf logits (the message
            names the teacher file and the first sample's key), or needs an input the batch
            lacks (the message names the input and the fields the batch has).
        InputError: a sample cannot be read (see the source's ``skip_bad``), a batch of the
            iterable is malformed, or ``input_map`` names a field the batch lacks.
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
        inputs = feed_teacher(teacher, batch.inputs, input_map)
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


def feed_teacher(teacher: Teacher, inputs: Inputs, input_map: Mapping[str, str] | None = None) -> Inputs:
    """What ``teacher.logits`` is given for a batch's inputs.

    The fields are first renamed per ``input_map`` (``{model_input: batch_field}``, see
    :func:`~calibrate_teacher.teachers._inputs.parse_input_map`). A teacher that takes several
    inputs gets the mapping (it picks its inputs by name, casts them and notes what it
    ignored); any other gets the one tensor: the entry of its name, else the only one. Fields a
    single-input teacher does not take are said once in its ``notes``.

    Raises:
        InputError: a mapped field is missing, or a single-input teacher cannot tell which
            entry is its input.
    """
    from calibrate_teacher.teachers._inputs import rename_fields
    from calibrate_teacher.teachers.base import single_input, takes_mapping

    inputs = rename_fields(inputs, input_map, where=teacher.path)
    if not isinstance(inputs, Mapping) or takes_mapping(teacher):
        return inputs
    names = teacher.input_names
    picked = single_input(inputs, name=names[0] if names else None, where=teacher.path)
    notes = teacher.notes
    ignored = [str(k) for k, v in inputs.items() if v is not picked]
    if ignored and isinstance(notes, list):
        note = (
            f"{teacher.path.name}: batch field(s) {', '.join(ignored)} ignored: the model takes one "
            f"input{f' ({names[0]})' if names else ''}"
        )
        if note not in notes:
            notes.append(note)
    return picked


def first_inputs(source: DataSource, *, rows: int = 4) -> Inputs:
    """The inputs of the first ``rows`` samples of a file source: a real probe for a bake.

    :func:`~calibrate_teacher.baking.bake_temperature` proves a multi-input teacher's bake on
    named inputs; the validation data's own first rows (real ids, real masks) are a better
    probe than made-up ones.

    Raises:
        InputError: the source yields no batch.
    """
    count = min(rows, len(source))
    for batch in source.batches(batch_size=max(count, 1), indices=range(count)):
        return batch.inputs
    raise InputError(f"{source.path}: no sample could be read for a probe batch")


def collect_logits(
    teacher: Teacher | Callable[..., object],
    source: DataSource | Iterable[object],
    *,
    batch_size: int = 64,
    workers: int = 0,
    progress: Callable[[int], None] | None = None,
    input_map: Mapping[str, str] | None = None,
) -> LogitSet:
    """Run the teacher over the whole source and return its logits with labels and keys.

    Args:
        teacher: The teacher to run: a loaded teacher, an ``nn.Module`` or a callable
            returning logits (see :func:`iter_logits`).
        source: The samples: a data source, or an iterable of batches such as a DataLoader.
        batch_size: Samples per teacher call (data sources; an iterable keeps its batches).
        workers: DataLoader worker processes (0: in this process).
        progress: Called after each batch with the number of samples just done.
        input_map: ``{model_input: batch_field}`` (see :func:`iter_logits`).

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
    order: list[torch.Tensor] = []
    for batch in iter_logits(
        teacher, source, batch_size=batch_size, workers=workers, progress=progress,
        input_map=input_map,
    ):
        logits.append(batch.logits)
        labels.append(batch.labels)
        keys.extend(batch.keys)
        order.append(batch.indices)
    if not keys:
        if not getattr(source, "skipped", None):
            raise InputError(f"{source.path}: no sample could be read: the data holds no batches")
        raise InputError(
            f"{source.path}: no sample could be read ({len(source)} in the source); "
            "see the skipped list"
        )
    all_logits, all_labels, index = torch.cat(logits), torch.cat(labels), torch.cat(order)
    if index.numel() > 1 and bool((index[1:] < index[:-1]).any()):
        # A source that batches out of order (text sorted by length): rows go back to data order.
        perm = torch.argsort(index, stable=True)
        all_logits, all_labels = all_logits[perm], all_labels[perm]
        keys = [keys[i] for i in perm.tolist()]
    return LogitSet(logits=all_logits, labels=all_labels, keys=tuple(keys))
