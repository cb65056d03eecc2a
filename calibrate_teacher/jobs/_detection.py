"""The detection jobs: ``evaluate_detector`` (D-ECE and mAP at one T) and ``calibrate_detector`` (fit T).

Both stream the images once (decoded per batch), run ``teacher.detect``, map the boxes back to
the original pixels and keep each image's top candidate pairs
(:class:`~calibrate_teacher.detection.candidates.CandidatePool`, selected at ``T = 1``); all
metrics and the temperature search then work on that pool. The teacher's own NMS is respected
(``Detections.nms_applied``); the operating point is stated in every report.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

from calibrate_teacher.detection.base import Detections, DetectionTeacher, OperatingPoint, to_original
from calibrate_teacher.detection.proposals import roi_report
from calibrate_teacher.errors import InputError, InvalidValueError, MissingDependencyError
from calibrate_teacher.jobs._detection_bake import bake_detector, bake_target
from calibrate_teacher.jobs._detection_results import DetectorCalibration, DetectorEvaluation
from calibrate_teacher.specs import DataSpec, TeacherSpec

if TYPE_CHECKING:
    from collections.abc import Mapping

    from calibrate_teacher.detection.candidates import CandidatePool
    from calibrate_teacher.detection.coco import CocoSource
    from calibrate_teacher.detection.fit import DetectionObjective
    from calibrate_teacher.detection.matching import Matching
    from calibrate_teacher.detection.metrics import DetectionCalibration
    from calibrate_teacher.jobs._detection_inputs import DetectionOptions
    from calibrate_teacher.jobs._logits import Progress

__all__ = ["DetectorCalibration", "DetectorEvaluation", "calibrate_detector", "evaluate_detector"]


def _cpu(d: Detections) -> Detections:
    return Detections(
        boxes=d.boxes.detach().float().cpu(),
        logits=d.logits.detach().float().cpu(),
        head=d.head,
        background=d.background,
        objectness=None if d.objectness is None else d.objectness.detach().float().cpu(),
        nms_applied=d.nms_applied,
    )


def _open(
    teacher: DetectionTeacher, data: CocoSource | DataSpec | str | os.PathLike[str], options: DetectionOptions | None
) -> CocoSource:
    from calibrate_teacher.jobs._detection_inputs import open_detection_data

    if not isinstance(teacher, DetectionTeacher):
        raise InvalidValueError(f"teacher: expected a loaded detection teacher, got {type(teacher).__name__}")
    source = open_detection_data(teacher, data, options)
    if source.num_classes != teacher.num_classes:
        raise InputError(
            f"{source.path}: maps {source.num_classes} classes ({source.description.get('classes_from')}) but the "
            f"teacher {teacher.path} has {teacher.num_classes}; pass the model's class names"
        )
    if source.background is not None and source.background != teacher.background:
        raise InvalidValueError(
            f"background: the data states {source.background!r} but the teacher's head has {teacher.background!r}"
        )
    return source


def _collect(
    teacher: DetectionTeacher,
    source: CocoSource,
    *,
    batch_size: int,
    workers: int,
    floor: float,
    max_candidates: int,
    row_threshold: float,
    progress: Progress | None,
) -> tuple[CandidatePool, list[str]]:
    from calibrate_teacher.detection.candidates import CandidatePool

    if not 0.0 <= floor <= 1.0:
        raise InvalidValueError(f"candidate_floor: expected a score in [0, 1], got {floor}")
    if isinstance(max_candidates, bool) or max_candidates < 1:
        raise InvalidValueError(f"max_candidates: expected a positive integer, got {max_candidates}")
    pool = CandidatePool(
        head=teacher.head,
        background=teacher.background,
        num_classes=teacher.num_classes,
        floor=floor,
        max_candidates=max_candidates,
        row_threshold=row_threshold,
    )
    notes: list[str] = []
    done = 0
    pin = str(teacher.device).startswith("cuda")
    for batch in source.batches(batch_size=batch_size, workers=workers, pin_memory=pin):
        outputs = teacher.detect(batch.images)
        if len(outputs) != len(batch.image_ids):
            raise InvalidValueError(
                f"teacher {teacher.path}: detect returned {len(outputs)} results for {len(batch.image_ids)} images"
            )
        for det, transform, target, image_id in zip(
            outputs, batch.transforms, batch.targets, batch.image_ids, strict=True
        ):
            if det.nms_applied and not notes:
                notes.append("the model applies NMS itself: the operating point's nms_iou is not applied again")
            pool.add(
                to_original(_cpu(det), transform),
                target,
                image_id=image_id,
                width=transform.width,
                height=transform.height,
            )
        done += len(batch.image_ids)
        if progress is not None:
            progress(done, len(source))
    if not pool.images:
        raise InputError(f"{source.path}: no image could be read")
    if pool.capped:
        notes.append(
            f"{pool.capped} image(s) had more than max_candidates={max_candidates} pairs scoring >= {floor}; "
            "only the highest were kept (raise max_candidates to keep more)"
        )
    return pool, notes


def _report(
    pool: CandidatePool,
    source: CocoSource,
    temperature: float,
    point: OperatingPoint,
    matching: Matching,
    n_bins: int,
    position_bins: int,
    min_bin_count: int,
) -> tuple[DetectionCalibration, list[str]]:
    from calibrate_teacher.detection.candidates import coco_results, detections_at
    from calibrate_teacher.detection.metrics import MeanAveragePrecision, coco_map, detection_calibration

    records, _ = detections_at(pool, temperature, point, matching=matching)
    notes = []
    try:
        results, left_out = coco_results(pool, records, source.category_ids)
        gt = source.coco_ground_truth(source.indices_of([i.image_id for i in pool.images]))
        mean_ap = coco_map(gt, results, max_detections=point.max_detections)
        if left_out:
            notes.append(f"{left_out} detections of classes without a COCO category are left out of mAP")
    except MissingDependencyError as exc:
        mean_ap = MeanAveragePrecision(None, None, str(exc))
    report = detection_calibration(
        records,
        num_gt=pool.num_gt(),
        class_names=source.class_names or [str(c) for c in range(pool.num_classes)],
        temperature=temperature,
        operating_point=point,
        matching=matching,
        num_images=len(pool.images),
        mean_ap=mean_ap,
        n_bins=n_bins,
        position_bins=position_bins,
        min_bin_count=min_bin_count,
    )
    return report, notes


def _teacher_info(teacher: DetectionTeacher) -> dict[str, object]:
    return {
        "path": str(teacher.path),
        "format": teacher.format,
        "num_classes": teacher.num_classes,
        "head": teacher.head,
        "background": teacher.background,
        "classes": None if teacher.class_names is None else list(teacher.class_names),
    }


def _start(
    teacher: DetectionTeacher | TeacherSpec | str | os.PathLike[str],
    data: CocoSource | DataSpec | str | os.PathLike[str],
    options: DetectionOptions | None,
    operating_point: OperatingPoint | Mapping[str, object] | None,
    candidate_floor: float,
    batch_size: int | None,
    workers: int | None,
) -> tuple[DetectionTeacher, CocoSource, OperatingPoint, float, list[str], int, int]:
    from calibrate_teacher.jobs._detection_inputs import open_detection_teacher, operating_point_of

    point, notes = operating_point_of(operating_point)  # a bad value fails before the teacher loads
    model = open_detection_teacher(teacher, options)
    source = _open(model, data, options)
    notes = list(model.notes) + list(source.notes) + notes
    if point is None:
        point = OperatingPoint()
        notes.append(
            f"operating point not given, using the defaults {point.to_json()}; set it to the one the teacher is used at"
        )
    floor = min(candidate_floor, point.score_threshold)
    spec = data if isinstance(data, DataSpec) else None
    batch = batch_size if batch_size is not None else spec.batch_size if spec is not None else 8
    procs = workers if workers is not None else spec.workers if spec is not None else 0
    return model, source, point, floor, notes, batch, procs


def _candidates_info(pool: CandidatePool, point: OperatingPoint) -> dict[str, object]:
    exact = pool.exact_up_to(point.score_threshold)
    return {
        "exact_up_to_temperature": None if exact is None else ("inf" if math.isinf(exact) else exact),
        "selected_at_temperature": 1.0,
        "floor": pool.floor,
        "max_candidates": pool.max_candidates,
        "pairs": pool.num_pairs,
        "capped_images": pool.capped,
    }


def evaluate_detector(
    teacher: DetectionTeacher | TeacherSpec | str | os.PathLike[str],
    data: CocoSource | DataSpec | str | os.PathLike[str],
    *,
    options: DetectionOptions | None = None,
    temperature: float | None = None,
    operating_point: OperatingPoint | Mapping[str, object] | None = None,
    matching: Matching = "greedy",
    n_bins: int = 20,
    position_bins: int = 5,
    min_bin_count: int = 1,
    batch_size: int | None = None,
    workers: int | None = None,
    candidate_floor: float = 0.001,
    max_candidates: int = 1000,
    progress: Progress | None = None,
) -> DetectorEvaluation:
    """Measure a detection teacher's calibration (D-ECE) and accuracy (mAP) at one temperature.

    Args:
        teacher: A loaded detection teacher, or its file (a path or a ``TeacherSpec``).
        data: A COCO source (:func:`~calibrate_teacher.detection.coco.open_coco`), or its files
            (a path or a ``DataSpec``), then opened with the teacher's class names and input size.
        options: What the detector and its data need beyond the specs (``--images``, head...).
        temperature: Divide the class logits by this (None: 1, the teacher as it is).
        operating_point: Score threshold, max detections, NMS IoU, match IoU: an
            :class:`OperatingPoint`, or a mapping of some of them (the rest take the defaults,
            noted); None: the defaults, noted.
        matching: ``greedy`` (COCO, default) or ``netcal`` (many-to-one).
        n_bins: Confidence bins of D-ECE.
        position_bins: Bins per feature of position D-ECE.
        min_bin_count: Bins with fewer detections add no deviation.
        batch_size: Images per batch (default: the ``DataSpec``'s, else 8).
        workers: DataLoader worker processes decoding images (default: the ``DataSpec``'s, else 0).
        candidate_floor: Pairs scoring below this at T = 1 are not kept (capped at the threshold).
        max_candidates: At most this many pairs per image are kept.
        progress: Called after each batch with (images done, total images).

    Returns:
        A :class:`DetectorEvaluation`.
    """
    from calibrate_teacher._validate import validate_temperature

    t = 1.0 if temperature is None else validate_temperature(temperature)
    model, source, point, floor, notes, batch, procs = _start(
        teacher, data, options, operating_point, candidate_floor, batch_size, workers
    )
    pool, more = _collect(
        model,
        source,
        batch_size=batch,
        workers=procs,
        floor=floor,
        max_candidates=max_candidates,
        row_threshold=point.score_threshold,
        progress=progress,
    )
    report, map_notes = _report(pool, source, t, point, matching, n_bins, position_bins, min_bin_count)
    if t != 1.0:
        exact = pool.exact_up_to(point.score_threshold)
        if exact is None or t > exact:
            notes.append(f"candidates were selected at T = 1 (score >= {floor}); at T = {t:g} some may be missing")
    roi, roi_skipped = roi_report(model, source, {"metrics": t}, n_bins=n_bins, batch_size=batch)
    notes += _roi_notes(roi)
    return DetectorEvaluation(
        teacher=_teacher_info(model),
        data=dict(source.description),
        report=report,
        candidates=_candidates_info(pool, point),
        notes=tuple(notes + more + map_notes),
        roi_classification=roi,
        roi_classification_skipped=roi_skipped,
    )


def calibrate_detector(
    teacher: DetectionTeacher | TeacherSpec | str | os.PathLike[str],
    data: CocoSource | DataSpec | str | os.PathLike[str],
    *,
    options: DetectionOptions | None = None,
    objective: DetectionObjective = "dece",
    temperature: float | None = None,
    operating_point: OperatingPoint | Mapping[str, object] | None = None,
    matching: Matching = "greedy",
    bounds: tuple[float, float] = (0.1, 10.0),
    grid: int = 32,
    n_bins: int = 20,
    position_bins: int = 5,
    min_bin_count: int = 1,
    batch_size: int | None = None,
    workers: int | None = None,
    candidate_floor: float = 0.001,
    max_candidates: int = 1000,
    bake: bool = False,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> DetectorCalibration:
    """Fit the temperature of a detection teacher's class logits; report D-ECE and mAP before and after.

    Args:
        teacher: A loaded detection teacher, or its file (a path or a ``TeacherSpec``).
        data: A COCO source, or its files (a path or a ``DataSpec``).
        options: What the detector and its data need beyond the specs.
        objective: ``dece`` (default), ``nll`` (exact: softmax-T or sigmoid-T by head), ``fixed``.
        temperature: The T for ``fixed`` (default 1.5).
        operating_point: Where detections are cut (an :class:`OperatingPoint`, a partial mapping,
            or None: the defaults, noted).
        matching: ``greedy`` (COCO) or ``netcal``.
        bounds: The range of T searched.
        grid: Temperatures in the sweep.
        n_bins: Confidence bins of D-ECE.
        position_bins: Bins per feature of position D-ECE.
        min_bin_count: Bins with fewer detections add no deviation.
        batch_size: Images per batch (default: the ``DataSpec``'s, else 8).
        workers: DataLoader worker processes (default: the ``DataSpec``'s, else 0).
        candidate_floor: Pairs scoring below this at T = 1 are not kept.
        max_candidates: At most this many pairs per image.
        bake: Also write the teacher with T baked into its class logits
            (:func:`~calibrate_teacher.detection.bake.bake_detector_temperature`, checked on
            the first batch of the data).
        out: Where the baked teacher goes (default ``<stem>.calibrated<suffix>`` beside it).
        overwrite: Replace ``out`` if it exists (checked before the teacher runs).
        progress: Called after each batch with (images done, total images).

    Returns:
        A :class:`DetectorCalibration` (``baked`` set when ``bake``).
    """
    from calibrate_teacher.detection.fit import fit_detection_temperature

    if out is not None and not bake:
        raise InvalidValueError("out: given without bake=True; nothing would be written there")
    model, source, point, floor, notes, batch, procs = _start(
        teacher, data, options, operating_point, candidate_floor, batch_size, workers
    )
    target = bake_target(model, out, overwrite) if bake else None
    pool, more = _collect(
        model,
        source,
        batch_size=batch,
        workers=procs,
        floor=floor,
        max_candidates=max_candidates,
        row_threshold=point.score_threshold,
        progress=progress,
    )
    fit = fit_detection_temperature(
        pool,
        objective=objective,
        temperature=temperature,
        operating_point=point,
        matching=matching,
        bounds=bounds,
        grid=grid,
        n_bins=n_bins,
    )
    before, map_notes = _report(pool, source, 1.0, point, matching, n_bins, position_bins, min_bin_count)
    after, _ = _report(pool, source, fit.temperature, point, matching, n_bins, position_bins, min_bin_count)
    exact = fit.exact_up_to
    if exact is None or fit.temperature > exact:
        notes.append(
            f"candidates were selected once at T = 1 (pairs scoring >= {floor}, at most {max_candidates} per image); "
            + (
                f"exact for T <= {exact:.4g}"
                if exact is not None and math.isfinite(exact)
                else "pairs below the floor at T = 1 are not rescored"
            )
        )
    if fit.at_bound:
        notes.append(f"T = {fit.temperature:.4g} sits on a search bound {fit.bounds}; widen bounds to search further")
    baked = None
    if target is not None:
        kwargs = teacher.arch_kwargs if isinstance(teacher, TeacherSpec) else None
        baked = bake_detector(model, source, fit.temperature, target, overwrite, options, kwargs)
        notes += [n for n in baked.notes if n not in notes]
    temperatures = {"before": 1.0, "after": fit.temperature}
    roi, roi_skipped = roi_report(model, source, temperatures, n_bins=n_bins, batch_size=batch)
    notes += _roi_notes(roi)
    return DetectorCalibration(
        teacher=_teacher_info(model),
        data=dict(source.description),
        fit=fit,
        before=before,
        after=after,
        candidates=_candidates_info(pool, point),
        notes=tuple(notes + more + map_notes),
        baked=baked,
        roi_classification=roi,
        roi_classification_skipped=roi_skipped,
    )


def _roi_notes(roi: Mapping[str, object] | None) -> list[str]:
    """Say which proposals the RoI classification metrics were measured on (defaults stood in)."""
    if roi is None:
        return []
    return [
        f"RoI classification: {roi.get('proposals')} proposals sampled as torchvision's RoI sampler does "
        "(at most 512 per image, at most 25% foreground at IoU >= 0.5, seed 0)"
    ]
