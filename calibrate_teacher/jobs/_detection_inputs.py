"""What the detection jobs open: a detection teacher and its COCO data, from files or specs.

The jobs take a loaded :class:`~calibrate_teacher.detection.base.DetectionTeacher` or a file
(a path or a :class:`~calibrate_teacher.TeacherSpec`), and a
:class:`~calibrate_teacher.detection.coco.CocoSource` or COCO files (a path or a
:class:`~calibrate_teacher.DataSpec`); :class:`DetectionOptions` holds what a detector and its
data need beyond those specs. The preprocessing of a COCO source opened here comes from, in
order: ``DataSpec.preprocess`` (a JSON file), ``<model>.preprocess.json`` / ``preprocess.json``
beside the teacher, the model's own input size (an ONNX graph's static height and width, or
ultralytics' ``imgsz`` metadata; an ultralytics export is letterboxed), defaults;
``DataSpec.overrides`` (``--input-size``, ``--mean``, ``--std``) win over all of them. The source
is named in the data's description.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from calibrate_teacher.detection.base import BackgroundLayout, DetectionTeacher, HeadKind, OperatingPoint
from calibrate_teacher.errors import InputError, InvalidValueError
from calibrate_teacher.specs import DataSpec, TeacherSpec

if TYPE_CHECKING:
    from calibrate_teacher.detection.coco import CocoSource

__all__ = ["DetectionOptions", "open_detection_data", "open_detection_teacher", "operating_point_of"]

PathLike = str | os.PathLike[str]
#: Classification preprocessing keys a detection source cannot honour.
_CLASSIFICATION_ONLY = ("interpolation", "crop_pct", "crop_mode")


@dataclass(frozen=True)
class DetectionOptions:
    """How to read a detection teacher and its COCO data, beyond ``TeacherSpec`` / ``DataSpec``.

    Attributes:
        images: The image folder of a COCO annotation file (default: found beside it).
        head: ``softmax`` or ``sigmoid``, checked against the model (default: read from it).
        background: A softmax head's background column: ``first`` (torchvision) or ``last``
            (detectron2); ``none`` for sigmoid heads.
        boxes_output: ONNX: the boxes output ``[B, N, 4]`` (xyxy), with ``scores_output``.
        scores_output: ONNX: the scores output ``[B, N, K]`` (after a Sigmoid or Softmax).
        class_layer: PyTorch: the class-logit layer's module name, where it is not at a known place.
    """

    images: PathLike | None = None
    head: HeadKind | None = None
    background: BackgroundLayout | None = None
    boxes_output: str | None = None
    scores_output: str | None = None
    class_layer: str | None = None


def open_detection_teacher(
    teacher: DetectionTeacher | TeacherSpec | PathLike, options: DetectionOptions | None = None
) -> DetectionTeacher:
    """``teacher`` itself when loaded, else the detector its file or spec names (see the module docstring).

    Raises:
        InvalidValueError: a spec option that does not apply to detectors, or conflicting options.
    """
    if isinstance(teacher, DetectionTeacher):
        return teacher
    from calibrate_teacher.detection.load import load_detection_teacher

    if not isinstance(teacher, TeacherSpec | str | os.PathLike):
        raise InvalidValueError(
            f"teacher: expected a loaded detection teacher (detect(images) -> Detections) or its file, "
            f"got {type(teacher).__name__}"
        )
    spec = TeacherSpec.of(teacher)
    if spec.path is None:
        raise InvalidValueError(
            "teacher: an in-memory detector must be a loaded DetectionTeacher (detect(images) -> Detections); "
            "or give its file"
        )
    opts = options or DetectionOptions()
    if spec.output is not None:
        raise InvalidValueError(
            f"output {spec.output!r}: detectors name their outputs with --boxes-output and --scores-output"
        )
    if spec.inputs:
        raise InvalidValueError("inputs: detectors take one image input; --input does not apply")
    layer = opts.class_layer
    if spec.head is not None:
        if layer is not None and layer != spec.head:
            raise InvalidValueError(f"head {spec.head!r} and class_layer {layer!r}: name the class-logit layer once")
        layer = spec.head
    return load_detection_teacher(
        spec.path, arch=spec.arch, arch_kwargs=spec.arch_kwargs, head=opts.head, background=opts.background,
        boxes_output=opts.boxes_output, scores_output=opts.scores_output, class_layer=layer, device=spec.device,
    )  # fmt: skip


def open_detection_data(
    teacher: DetectionTeacher,
    data: CocoSource | DataSpec | PathLike,
    options: DetectionOptions | None = None,
) -> CocoSource:
    """``data`` itself when it is a COCO source, else its files opened for ``teacher``.

    Classes: ``DataSpec.classes``, else the teacher's class names, else the json's categories in
    id order (the description says which).
    """
    from calibrate_teacher.detection.coco import CocoSource, open_coco

    if isinstance(data, CocoSource):
        if options is not None and options.images is not None:
            raise InvalidValueError("images: the COCO source is already open; give the folder to open_coco")
        return data
    spec = DataSpec.of(data)
    if spec.path is None:
        raise InvalidValueError(
            f"data {type(spec.source).__name__}: detection data is COCO annotations (a .json and its images), "
            "or a source from open_coco"
        )
    if spec.text is not None:
        raise InvalidValueError(f"{spec.path}: text options do not apply to COCO detection data")
    preprocess, origin = _preprocess(teacher, spec)
    classes, classes_origin = _classes(teacher, spec)
    images = None if options is None else options.images
    return open_coco(
        spec.path, images=images, classes=classes, classes_origin=classes_origin, background=teacher.background,
        preprocess=preprocess, preprocess_origin=origin, skip_bad=spec.skip_bad,
    )  # fmt: skip


def _classes(teacher: DetectionTeacher, spec: DataSpec) -> tuple[tuple[str, ...] | None, str]:
    from calibrate_teacher.data import read_class_list

    if isinstance(spec.classes, str | os.PathLike):
        return tuple(read_class_list(spec.classes)), str(spec.classes)
    if spec.classes is not None:
        return tuple(spec.classes), "the given class list"
    if teacher.class_names is not None:
        return teacher.class_names, "the teacher's class names"
    return None, ""


def _preprocess(teacher: DetectionTeacher, spec: DataSpec) -> tuple[dict[str, object], str]:
    """The preprocess spec (detection keys) and where it came from."""
    from calibrate_teacher.teachers._preprocessing import preprocess_sidecar

    values: dict[str, object] = {}
    origin = "defaults"
    if spec.preprocess is not None:
        if not isinstance(spec.preprocess, str | os.PathLike):
            raise InvalidValueError(
                "preprocess: detection data takes a JSON file or mapping of mode, input_size, mean, std; "
                "a classification PreprocessConfig does not apply"
            )
        values, origin = _read(Path(spec.preprocess)), f"--preprocess {spec.preprocess}"
    elif (sidecar := preprocess_sidecar(teacher.path)) is not None:
        values, origin = _read(sidecar), f"{sidecar} beside the model"
    else:
        size = getattr(teacher, "image_size", None)  # ONNX: the graph's height and width, or imgsz
        if size is not None:
            values = {"input_size": [int(size[0]), int(size[1])]}
            origin = f"the input size of {Path(teacher.path).name}"
            if getattr(teacher, "layout", None) == "ultralytics":  # ultralytics letterboxes what it detects on
                values["mode"] = "letterbox"
                origin = f"the input size of {Path(teacher.path).name}, letterboxed as ultralytics does"
    overrides = dict(spec.overrides or {})
    refused = [k for k in _CLASSIFICATION_ONLY if k in overrides]
    if refused:
        raise InvalidValueError(
            f"{', '.join(refused)}: classification preprocessing; detection data is letterboxed or resized "
            "(mode, input_size, mean, std)"
        )
    if overrides:
        values.update(overrides)
        origin += f", with {', '.join(sorted(overrides))} given"
    return values, origin


def _read(path: Path) -> dict[str, object]:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such preprocess file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable JSON preprocess file ({exc})") from exc
    if not isinstance(values, dict):
        raise InputError(f"{path}: expected a JSON object with mode, input_size, mean, std")
    return values


def operating_point_of(point: OperatingPoint | Mapping[str, object] | None) -> tuple[OperatingPoint | None, list[str]]:
    """An operating point from a partial mapping (missing keys take the defaults, noted)."""
    if point is None or isinstance(point, OperatingPoint):
        return point, []
    known = set(OperatingPoint().to_json())
    unknown = sorted(set(point) - known)
    if unknown:
        raise InvalidValueError(
            f"operating_point: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    given = {k: v for k, v in point.items() if v is not None}
    built = OperatingPoint(**given)  # type: ignore[arg-type]
    _check(built)
    missing = [k for k in OperatingPoint().to_json() if k not in given]
    notes = []
    if missing:
        defaults = {k: v for k, v in built.to_json().items() if k in missing}
        notes.append(f"operating point: {', '.join(missing)} not given, using the default(s) {defaults}")
    return built, notes


def _check(point: OperatingPoint) -> None:
    for name in ("score_threshold", "match_iou"):
        value = getattr(point, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
            raise InvalidValueError(f"operating_point {name}: expected a number in [0, 1], got {value!r}")
    if point.nms_iou is not None and not 0.0 < point.nms_iou <= 1.0:
        raise InvalidValueError(f"operating_point nms_iou: expected a number in (0, 1], got {point.nms_iou!r}")
    if isinstance(point.max_detections, bool) or not isinstance(point.max_detections, int) or point.max_detections < 1:
        raise InvalidValueError(
            f"operating_point max_detections: expected an integer >= 1, got {point.max_detections!r}"
        )
