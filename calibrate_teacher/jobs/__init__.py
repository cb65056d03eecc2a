"""The jobs: the only place that loads a teacher, runs it over data, and writes what it found.

Each CLI command builds a :class:`~calibrate_teacher.TeacherSpec` and a
:class:`~calibrate_teacher.DataSpec` once, calls **one** job, and renders what it returns; a KD
script calls the same jobs directly::

    import calibrate_teacher as ct

    run = ct.calibrate("teacher.onnx", "val/")            # fit T, bake teacher.calibrated.onnx
    print(run.fit.temperature, run.fit.after.ece, run.baked.path)

    run = ct.calibrate(teacher, val_loader)               # an nn.Module and a DataLoader
    teacher = ct.apply_temperature(teacher, run.fit.temperature, probe=run.probe)

    ct.export_soft_labels("teacher.onnx", "train/", "cache/", temperature=run.fit.temperature)

    from calibrate_teacher.jobs import calibrate_detector          # detection teachers (#14)

    run = calibrate_detector("detector.onnx", "coco/annotations.json", bake=True)
    print(run.fit.temperature, run.after.dece.dece, run.baked.path)

Every job checks its outputs are writable before the teacher runs.
"""

from __future__ import annotations

from calibrate_teacher.jobs._calibrate import CalibrationRun, Evaluation, calibrate, evaluate
from calibrate_teacher.jobs._detection import calibrate_detector, evaluate_detector
from calibrate_teacher.jobs._detection_export import export_detector_soft_labels
from calibrate_teacher.jobs._detection_inputs import DetectionOptions
from calibrate_teacher.jobs._detection_results import DetectorCalibration, DetectorEvaluation, DetectorSoftLabels
from calibrate_teacher.jobs._export import export_soft_labels
from calibrate_teacher.jobs._export_tokens import export_token_soft_labels
from calibrate_teacher.jobs._logits import LogitSource, Progress, obtain_logits

__all__ = [
    "CalibrationRun",
    "DetectionOptions",
    "DetectorCalibration",
    "DetectorEvaluation",
    "DetectorSoftLabels",
    "Evaluation",
    "LogitSource",
    "Progress",
    "calibrate",
    "calibrate_detector",
    "evaluate",
    "evaluate_detector",
    "export_detector_soft_labels",
    "export_soft_labels",
    "export_token_soft_labels",
    "obtain_logits",
]
