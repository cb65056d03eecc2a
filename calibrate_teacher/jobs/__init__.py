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

Every job checks its outputs are writable before the teacher runs.
"""

from __future__ import annotations

from calibrate_teacher.jobs._calibrate import CalibrationRun, Evaluation, calibrate, evaluate
from calibrate_teacher.jobs._export import export_soft_labels
from calibrate_teacher.jobs._logits import LogitSource, Progress, obtain_logits

__all__ = [
    "CalibrationRun",
    "Evaluation",
    "LogitSource",
    "Progress",
    "calibrate",
    "evaluate",
    "export_soft_labels",
    "obtain_logits",
]
