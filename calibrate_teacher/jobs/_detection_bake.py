"""The bake step of ``calibrate_detector``: T into the fitted detector's class logits, checked on its data."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

    from calibrate_teacher.detection.bake import DetectorBake
    from calibrate_teacher.detection.base import DetectionTeacher
    from calibrate_teacher.detection.coco import CocoSource
    from calibrate_teacher.jobs._detection_inputs import DetectionOptions

__all__ = ["bake_detector", "bake_target"]


def bake_target(teacher: DetectionTeacher, out: str | os.PathLike[str] | None, overwrite: bool) -> Path:
    """Where the baked detector goes; refused up front when it exists (before the teacher runs)."""
    from calibrate_teacher._io import check_output
    from calibrate_teacher.baking import default_baked_path

    target = default_baked_path(Path(teacher.path)) if out is None else Path(out)
    check_output(target, overwrite=overwrite)
    return target


def bake_detector(
    teacher: DetectionTeacher,
    source: CocoSource,
    temperature: float,
    target: Path,
    overwrite: bool,
    options: DetectionOptions | None,
    arch_kwargs: Mapping[str, object] | str | None,
) -> DetectorBake:
    """Bake T into the detector's class logits, checked on the first images of ``source``."""
    from calibrate_teacher.detection.bake import bake_detector_temperature

    opts = options
    return bake_detector_temperature(
        teacher.path, temperature, out=target, overwrite=overwrite, probe=source.batches(batch_size=2),
        arch=getattr(teacher, "arch", None), arch_kwargs=arch_kwargs, head=teacher.head, background=teacher.background,
        boxes_output=None if opts is None else opts.boxes_output,
        scores_output=None if opts is None else opts.scores_output,
        class_layer=getattr(teacher, "class_layer", None), device=teacher.device,
    )  # fmt: skip
