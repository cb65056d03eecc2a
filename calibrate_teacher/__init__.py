"""calibrate-teacher: measure and fix a teacher's calibration before knowledge distillation.

The public API is re-exported here and imported lazily, so ``import calibrate_teacher`` (and the
CLI's ``--help``) never pays for torch or onnxruntime until a function needs them::

    import calibrate_teacher as ct

    fit = ct.fit_temperature(logits, labels, objective="ece")
    print(fit.temperature, fit.before.ece, fit.after.ece, fit.verdict)

and, inside a KD script that holds the teacher module and the validation DataLoader::

    run = ct.calibrate(teacher, data=val_loader)           # T (ECE by default), before/after
    teacher = ct.apply_temperature(teacher, run.fit.temperature, probe=run.probe)
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from calibrate_teacher._version import __version__
from calibrate_teacher.errors import (
    BakeError,
    CacheError,
    CalibrateTeacherError,
    InputError,
    InvalidValueError,
    MissingDependencyError,
    OutputError,
    OutputExistsError,
    TeacherError,
)

#: Public name -> the module that defines it.
_LAZY: dict[str, str] = {
    "LogitSet": "calibrate_teacher.logits",
    "load_logits": "calibrate_teacher.logits",
    "BinStats": "calibrate_teacher.metrics",
    "CalibrationMetrics": "calibrate_teacher.metrics",
    "DEFINITIONS": "calibrate_teacher.metrics",
    "calibration_metrics": "calibrate_teacher.metrics",
    "calibration_metrics_from_probs": "calibrate_teacher.metrics",
    "expected_calibration_error": "calibrate_teacher.metrics",
    "adaptive_calibration_error": "calibrate_teacher.metrics",
    "classwise_calibration_error": "calibrate_teacher.metrics",
    "SweepPoint": "calibrate_teacher.temperature",
    "TemperatureFit": "calibrate_teacher.temperature",
    "fit_temperature": "calibrate_teacher.temperature",
    "sweep": "calibrate_teacher.temperature",
    "InputSpec": "calibrate_teacher.teachers.base",
    "Teacher": "calibrate_teacher.teachers.base",
    "load_teacher": "calibrate_teacher.teachers",
    "BakeResult": "calibrate_teacher.baking",
    "apply_temperature": "calibrate_teacher.baking",
    "bake_temperature": "calibrate_teacher.baking",
    "default_baked_path": "calibrate_teacher.baking",
    "CacheManifest": "calibrate_teacher.soft_labels",
    "Calibration": "calibrate_teacher.soft_labels",
    "SoftLabelCache": "calibrate_teacher.soft_labels",
    "SoftLabelDataset": "calibrate_teacher.soft_labels",
    "kd_loss": "calibrate_teacher.soft_labels",
    "verify_cache": "calibrate_teacher.soft_labels",
    "write_soft_labels": "calibrate_teacher.soft_labels",
    "open_data": "calibrate_teacher.data",
    "ImageFolderDataset": "calibrate_teacher.data",
    "PreprocessConfig": "calibrate_teacher.data.preprocess",
    "LogitBatch": "calibrate_teacher.collect",
    "collect_logits": "calibrate_teacher.collect",
    "iter_logits": "calibrate_teacher.collect",
    "CalibrationRun": "calibrate_teacher.jobs",
    "Evaluation": "calibrate_teacher.jobs",
    "LogitSource": "calibrate_teacher.jobs",
    "calibrate": "calibrate_teacher.jobs",
    "evaluate": "calibrate_teacher.jobs",
    "obtain_logits": "calibrate_teacher.jobs",
    "export_soft_labels": "calibrate_teacher.jobs",
    "export_token_soft_labels": "calibrate_teacher.jobs",
    "TokenSoftLabelCache": "calibrate_teacher.soft_labels",
    "token_kd_loss": "calibrate_teacher.soft_labels",
    "export_distillkit": "calibrate_teacher.soft_labels",
    "DataSpec": "calibrate_teacher.specs",
    "TeacherSpec": "calibrate_teacher.specs",
    "TextOptions": "calibrate_teacher.specs",
}

__all__ = [
    "DEFINITIONS",
    "BakeError",
    "BakeResult",
    "BinStats",
    "CacheError",
    "CacheManifest",
    "CalibrateTeacherError",
    "Calibration",
    "CalibrationMetrics",
    "CalibrationRun",
    "DataSpec",
    "Evaluation",
    "ImageFolderDataset",
    "InputError",
    "InputSpec",
    "InvalidValueError",
    "LogitBatch",
    "LogitSet",
    "LogitSource",
    "MissingDependencyError",
    "OutputError",
    "OutputExistsError",
    "PreprocessConfig",
    "SoftLabelCache",
    "SoftLabelDataset",
    "SweepPoint",
    "Teacher",
    "TeacherError",
    "TeacherSpec",
    "TemperatureFit",
    "TextOptions",
    "TokenSoftLabelCache",
    "__version__",
    "adaptive_calibration_error",
    "apply_temperature",
    "bake_temperature",
    "calibrate",
    "calibration_metrics",
    "calibration_metrics_from_probs",
    "classwise_calibration_error",
    "collect_logits",
    "default_baked_path",
    "evaluate",
    "expected_calibration_error",
    "export_distillkit",
    "export_soft_labels",
    "export_token_soft_labels",
    "fit_temperature",
    "iter_logits",
    "kd_loss",
    "load_logits",
    "load_teacher",
    "obtain_logits",
    "open_data",
    "sweep",
    "token_kd_loss",
    "verify_cache",
    "write_soft_labels",
]

if TYPE_CHECKING:
    from calibrate_teacher.baking import BakeResult, apply_temperature, bake_temperature, default_baked_path
    from calibrate_teacher.collect import LogitBatch, collect_logits, iter_logits
    from calibrate_teacher.data import ImageFolderDataset, open_data
    from calibrate_teacher.data.preprocess import PreprocessConfig
    from calibrate_teacher.jobs import (
        CalibrationRun,
        Evaluation,
        LogitSource,
        calibrate,
        evaluate,
        export_soft_labels,
        export_token_soft_labels,
        obtain_logits,
    )
    from calibrate_teacher.logits import LogitSet, load_logits
    from calibrate_teacher.metrics import (
        DEFINITIONS,
        BinStats,
        CalibrationMetrics,
        adaptive_calibration_error,
        calibration_metrics,
        calibration_metrics_from_probs,
        classwise_calibration_error,
        expected_calibration_error,
    )
    from calibrate_teacher.soft_labels import (
        CacheManifest,
        Calibration,
        SoftLabelCache,
        SoftLabelDataset,
        TokenSoftLabelCache,
        export_distillkit,
        kd_loss,
        token_kd_loss,
        verify_cache,
        write_soft_labels,
    )
    from calibrate_teacher.specs import DataSpec, TeacherSpec, TextOptions
    from calibrate_teacher.teachers import load_teacher
    from calibrate_teacher.teachers.base import InputSpec, Teacher
    from calibrate_teacher.temperature import SweepPoint, TemperatureFit, fit_temperature, sweep


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'calibrate_teacher' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
