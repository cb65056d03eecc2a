"""Detection teachers: COCO data, detection calibration (D-ECE, mAP), per-box temperature, baked detectors.

The public detection API, imported lazily (``import calibrate_teacher.detection`` pays for no
torch or onnxruntime)::

    from calibrate_teacher import detection as det

    teacher = det.load_detection_teacher("yolov8n.onnx")
    source = det.open_coco("coco/annotations.json", images="coco/images", classes=teacher.class_names)
    det.bake_detector_temperature("yolov8n.onnx", 1.8)
    cache = det.open_detection_cache("det-cache/")

The jobs that run a teacher over data (``evaluate_detector``, ``calibrate_detector``,
``export_detector_soft_labels``) live in :mod:`calibrate_teacher.jobs`. See docs/detection.md.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

#: Public name -> the module that defines it.
_LAZY: dict[str, str] = {
    "BackgroundLayout": "calibrate_teacher.detection.base",
    "DetectionBatch": "calibrate_teacher.detection.base",
    "DetectionTeacher": "calibrate_teacher.detection.base",
    "Detections": "calibrate_teacher.detection.base",
    "GroundTruth": "calibrate_teacher.detection.base",
    "HeadKind": "calibrate_teacher.detection.base",
    "ImageTransform": "calibrate_teacher.detection.base",
    "OperatingPoint": "calibrate_teacher.detection.base",
    "foreground_scores": "calibrate_teacher.detection.base",
    "to_original": "calibrate_teacher.detection.base",
    "CocoSource": "calibrate_teacher.detection.coco",
    "open_coco": "calibrate_teacher.detection.coco",
    "DetectionPreprocess": "calibrate_teacher.detection._transform",
    "parse_detection_preprocess": "calibrate_teacher.detection._transform",
    "is_detection_onnx": "calibrate_teacher.detection.load",
    "load_detection_teacher": "calibrate_teacher.detection.load",
    "match_detections": "calibrate_teacher.detection.matching",
    "DetectionCalibration": "calibrate_teacher.detection.metrics",
    "DetectionECE": "calibrate_teacher.detection.metrics",
    "MeanAveragePrecision": "calibrate_teacher.detection.metrics",
    "coco_map": "calibrate_teacher.detection.metrics",
    "detection_calibration_error": "calibrate_teacher.detection.metrics",
    "CandidatePool": "calibrate_teacher.detection.candidates",
    "detections_at": "calibrate_teacher.detection.candidates",
    "DetectionTemperatureFit": "calibrate_teacher.detection.fit",
    "fit_detection_temperature": "calibrate_teacher.detection.fit",
    "DetectorBake": "calibrate_teacher.detection.bake",
    "bake_detector_temperature": "calibrate_teacher.detection.bake",
    "CachedDetections": "calibrate_teacher.detection.cache",
    "DetectionCache": "calibrate_teacher.detection.cache",
    "DetectionCacheInfo": "calibrate_teacher.detection.cache",
    "export_detection_soft_labels": "calibrate_teacher.detection.cache",
    "open_detection_cache": "calibrate_teacher.detection.cache",
}

__all__ = [
    "BackgroundLayout",
    "CachedDetections",
    "CandidatePool",
    "CocoSource",
    "DetectionBatch",
    "DetectionCache",
    "DetectionCacheInfo",
    "DetectionCalibration",
    "DetectionECE",
    "DetectionPreprocess",
    "DetectionTeacher",
    "DetectionTemperatureFit",
    "Detections",
    "DetectorBake",
    "GroundTruth",
    "HeadKind",
    "ImageTransform",
    "MeanAveragePrecision",
    "OperatingPoint",
    "bake_detector_temperature",
    "coco_map",
    "detection_calibration_error",
    "detections_at",
    "export_detection_soft_labels",
    "fit_detection_temperature",
    "foreground_scores",
    "is_detection_onnx",
    "load_detection_teacher",
    "match_detections",
    "open_coco",
    "open_detection_cache",
    "parse_detection_preprocess",
    "to_original",
]

if TYPE_CHECKING:
    from calibrate_teacher.detection._transform import DetectionPreprocess, parse_detection_preprocess
    from calibrate_teacher.detection.bake import DetectorBake, bake_detector_temperature
    from calibrate_teacher.detection.base import (
        BackgroundLayout,
        DetectionBatch,
        Detections,
        DetectionTeacher,
        GroundTruth,
        HeadKind,
        ImageTransform,
        OperatingPoint,
        foreground_scores,
        to_original,
    )
    from calibrate_teacher.detection.cache import (
        CachedDetections,
        DetectionCache,
        DetectionCacheInfo,
        export_detection_soft_labels,
        open_detection_cache,
    )
    from calibrate_teacher.detection.candidates import CandidatePool, detections_at
    from calibrate_teacher.detection.coco import CocoSource, open_coco
    from calibrate_teacher.detection.fit import DetectionTemperatureFit, fit_detection_temperature
    from calibrate_teacher.detection.load import is_detection_onnx, load_detection_teacher
    from calibrate_teacher.detection.matching import match_detections
    from calibrate_teacher.detection.metrics import (
        DetectionCalibration,
        DetectionECE,
        MeanAveragePrecision,
        coco_map,
        detection_calibration_error,
    )


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'calibrate_teacher.detection' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
