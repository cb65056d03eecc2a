"""The dense-detector soft-label job: run a detection teacher over COCO images once, cache z/T."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from calibrate_teacher.jobs._detection_results import DetectorSoftLabels

if TYPE_CHECKING:
    from collections.abc import Iterator

    from calibrate_teacher.detection.base import DetectionBatch, DetectionTeacher
    from calibrate_teacher.detection.cache import LogitDtype
    from calibrate_teacher.detection.coco import CocoSource
    from calibrate_teacher.jobs._detection_inputs import DetectionOptions
    from calibrate_teacher.jobs._logits import Progress
    from calibrate_teacher.specs import DataSpec, TeacherSpec

__all__ = ["export_detector_soft_labels"]


def export_detector_soft_labels(
    teacher: DetectionTeacher | TeacherSpec | str | os.PathLike[str],
    data: CocoSource | DataSpec | str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    temperature: float,
    options: DetectionOptions | None = None,
    top_candidates: int = 100,
    top_k: int | None = None,
    dtype: LogitDtype = "float32",
    shard_images: int = 1024,
    batch_size: int | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> DetectorSoftLabels:
    """Cache each image's top pre-NMS candidates with class logits ``z / T`` (dense-detector KD).

    Opens the teacher and the COCO data as :func:`~calibrate_teacher.jobs.evaluate_detector`
    does, then streams the images through
    :func:`~calibrate_teacher.detection.cache.export_detection_soft_labels`.

    Args:
        teacher: A loaded detection teacher, or its file (a path or a ``TeacherSpec``).
        data: A COCO source, or its files (a path or a ``DataSpec``).
        out: The cache folder to create.
        temperature: T (finite, > 0), e.g. the one ``calibrate_detector`` fitted.
        options: What the detector and its data need beyond the specs.
        top_candidates: Keep at most this many candidates per image, by score at T.
        top_k: Softmax heads only: store the top-k of ``z / T`` and the row logsumexp.
        dtype: Stored dtype of the logits (``float32`` or ``float16``).
        shard_images: Images per shard.
        batch_size: Images per batch (default: the ``DataSpec``'s, else 8).
        workers: DataLoader worker processes (default: the ``DataSpec``'s, else 0).
        overwrite: Replace an existing cache folder.
        progress: Called after each batch with (images done, total images).

    Returns:
        A :class:`DetectorSoftLabels` (read the cache with
        :func:`~calibrate_teacher.detection.cache.open_detection_cache`).
    """
    from calibrate_teacher._io import check_output
    from calibrate_teacher._validate import validate_temperature
    from calibrate_teacher.detection.cache import export_detection_soft_labels
    from calibrate_teacher.jobs._detection import _open, _teacher_info
    from calibrate_teacher.jobs._detection_inputs import open_detection_teacher
    from calibrate_teacher.specs import DataSpec

    value = validate_temperature(temperature)
    check_output(out, overwrite=overwrite)  # before the teacher runs
    model = open_detection_teacher(teacher, options)
    source = _open(model, data, options)
    spec = data if isinstance(data, DataSpec) else None
    batch = batch_size if batch_size is not None else spec.batch_size if spec is not None else 8
    procs = workers if workers is not None else spec.workers if spec is not None else 0

    def batches() -> Iterator[DetectionBatch]:
        done = 0
        for item in source.batches(batch_size=batch, workers=procs):
            yield item
            done += len(item.image_ids)
            if progress is not None:
                progress(done, len(source))

    info = export_detection_soft_labels(
        model, batches(), out, temperature=value, top_candidates=top_candidates, top_k=top_k, dtype=dtype,
        shard_images=shard_images, overwrite=overwrite,
    )  # fmt: skip
    return DetectorSoftLabels(
        cache=info,
        teacher=_teacher_info(model),
        data=dict(source.description),
        notes=tuple(list(model.notes) + list(source.notes)),
    )
