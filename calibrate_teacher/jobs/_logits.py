"""Getting logits: from a logit file, or by running a teacher over data (the one teacher run per job)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from calibrate_teacher.errors import InvalidValueError
from calibrate_teacher.specs import DataSpec, TeacherSpec

if TYPE_CHECKING:
    from calibrate_teacher.logits import LogitSet
    from calibrate_teacher.teachers.base import Inputs

PathLike = str | os.PathLike[str]
#: ``progress(done, total)``: ``done`` samples were just processed out of ``total`` (0: unknown).
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class LogitSource:
    """Logits with where they came from.

    Attributes:
        logits: The logits and labels (and keys).
        description: JSON-ready: the logit file, or the teacher (path, format, sha256) and the
            data (preprocessing included).
        skipped: ``(key, reason)`` for each sample skipped as unreadable (``skip_bad``).
        notes: Things the user should know (which ONNX provider really ran, ...).
        probe: The first input rows the teacher ran on (an in-memory teacher: CPU copies, at
            most 8; a data file or folder: its first 4 samples): real inputs for
            :func:`~calibrate_teacher.baking.bake_temperature` and
            :func:`~calibrate_teacher.baking.apply_temperature` to prove a bake on.
    """

    logits: LogitSet
    description: dict[str, object]
    skipped: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = ()
    probe: Inputs | None = None


def obtain_logits(
    teacher: TeacherSpec | PathLike | object | None = None,
    data: DataSpec | PathLike | object | None = None,
    *,
    logits: PathLike | LogitSource | None = None,
    labels: PathLike | None = None,
    save_logits: PathLike | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> LogitSource:
    """Read logits from ``logits``, or run ``teacher`` over ``data`` (optionally saving them).

    Args:
        teacher: A :class:`~calibrate_teacher.TeacherSpec`, a teacher file, or an in-memory
            ``nn.Module`` / callable returning logits (measured in eval mode, never moved).
        data: A :class:`~calibrate_teacher.DataSpec`, a folder or array file, or an iterable of
            ``(inputs, labels)`` batches or mappings with ``labels`` (a DataLoader).
        logits: Precomputed logits instead of ``data``: a file, or a LogitSource (returned as is).
        labels: For ``.npy`` logits: the labels file.
        save_logits: Also save the teacher's logits here (``.safetensors``, ``.npz``, ``.pt``);
            checked before the teacher runs.
        overwrite: Replace ``save_logits`` if it exists.
        progress: Called after each batch with (samples done, total samples).

    Raises:
        InvalidValueError: neither or both of ``logits`` and ``data``; ``data`` without
            ``teacher``; an option that does not apply to an in-memory teacher or data.
        InputError, TeacherError: unreadable files, mismatched classes, a failing teacher.
        OutputExistsError, OutputError: ``save_logits`` exists or cannot be written.
    """
    if isinstance(logits, LogitSource):
        return logits
    if (logits is None) == (data is None):
        raise InvalidValueError("give exactly one of --logits FILE or --data PATH")
    if logits is not None:
        from calibrate_teacher.logits import load_logits

        logit_set = load_logits(logits, labels=labels)
        return LogitSource(
            logits=logit_set,
            description={"logits": str(logits), "num_samples": logit_set.num_samples,
                         "num_classes": logit_set.num_classes},
        )
    if teacher is None:
        raise InvalidValueError("--data needs a TEACHER model to run; or pass --logits FILE instead")
    teacher_spec, data_spec = TeacherSpec.of(teacher), DataSpec.of(data)
    if save_logits is not None:
        from calibrate_teacher._io import check_output
        from calibrate_teacher.logits import check_save_suffix

        check_save_suffix(save_logits)
        check_output(save_logits, overwrite=overwrite)  # fail before the long run, not after it
    from calibrate_teacher.collect import collect_logits, first_inputs
    from calibrate_teacher.data import IterableSource
    from calibrate_teacher.teachers._memory import MemoryTeacher

    model = teacher_spec.load()
    source = data_spec.open(model, trust_remote_code=teacher_spec.trust_remote_code)
    # An iterable's length may be known only after the pass: progress then gets total = 0.
    total = (source.length_hint() or 0) if isinstance(source, IterableSource) else len(source)
    callback = (lambda n: progress(n, total)) if progress is not None else None
    # The data's own first rows (real ids and masks, real images): the probe a bake is proven on.
    probe = None if isinstance(source, IterableSource) or len(source) == 0 else first_inputs(source)
    logit_set = collect_logits(
        model, source, batch_size=data_spec.batch_size, workers=data_spec.workers, progress=callback,
        input_map=teacher_spec.inputs,
    )
    if save_logits is not None:
        logit_set.save(save_logits, overwrite=overwrite)
    description: dict[str, object] = {
        "teacher": describe_teacher(teacher_spec, model),
        "data": dict(getattr(source, "description", {"path": str(source.path)})),
        "num_samples": logit_set.num_samples,
        "num_classes": logit_set.num_classes,
    }
    if save_logits is not None:
        description["saved_logits"] = str(save_logits)
    skipped = tuple(source.skipped) if hasattr(source, "skipped") else ()
    if skipped:
        description["skipped"] = [{"key": k, "reason": r} for k, r in skipped]
    return LogitSource(
        logits=logit_set,
        description=description,
        skipped=skipped,
        # What the teacher said, then what stood in for data options not given (text sources).
        notes=tuple(getattr(model, "notes", ())) + tuple(getattr(source, "notes", ())),
        probe=model.sample if isinstance(model, MemoryTeacher) else probe,
    )


def describe_teacher(spec: TeacherSpec, model: object) -> dict[str, object]:
    """The teacher block of a report: what was loaded, and for a file its SHA-256 and format."""
    from calibrate_teacher._io import sha256_file

    described: dict[str, object] = {
        "format": getattr(model, "format", None),
        "num_classes": getattr(model, "num_classes", None),
        "device": getattr(model, "device", None),
    }
    if spec.path is not None:
        described = {"path": str(spec.path), "sha256": sha256_file(spec.path), **described}
    else:
        described = {"module": str(getattr(model, "path", type(spec.source).__name__)), **described}
    for key in ("output", "arch"):
        if getattr(spec, key) is not None:
            described[key] = getattr(spec, key)
    return described
