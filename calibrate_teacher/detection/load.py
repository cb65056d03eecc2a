"""Load a detection teacher from a file: ONNX (:mod:`._onnx`) or weights + ``--arch`` (:mod:`._torch`).

The format is read as for classification teachers (suffix confirmed by the bytes,
:func:`~calibrate_teacher.teachers._files.detect_format`). :func:`is_detection_onnx` tells a
detector export from a classifier without starting a session, so a front end can route a model
to the right loader.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from calibrate_teacher._device import check_device
from calibrate_teacher.errors import InvalidValueError, TeacherError
from calibrate_teacher.teachers._files import detect_format

if TYPE_CHECKING:
    from calibrate_teacher.detection._onnx import OnnxDetectionTeacher
    from calibrate_teacher.detection._torch import TorchDetectionTeacher
    from calibrate_teacher.detection.base import BackgroundLayout, HeadKind

__all__ = ["is_detection_onnx", "load_detection_teacher"]

_HEADS = ("softmax", "sigmoid")
_BACKGROUNDS = ("first", "last", "none")


def load_detection_teacher(
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    arch_kwargs: Mapping[str, object] | str | None = None,
    head: HeadKind | None = None,
    background: BackgroundLayout | None = None,
    boxes_output: str | None = None,
    scores_output: str | None = None,
    class_layer: str | None = None,
    device: str = "auto",
) -> OnnxDetectionTeacher | TorchDetectionTeacher:
    """Load a detector whose ``detect(images)`` gives pre-NMS candidates with class logits.

    Args:
        path: An ONNX export (ultralytics YOLOv8/v11, YOLOX/YOLOv5, or named box/score
            outputs), or a ``.safetensors`` / ``.pt`` state dict with ``arch``.
        arch: ``pkg.module:factory`` or ``path/file.py:factory`` building the PyTorch detector
            (its forward contract: :mod:`calibrate_teacher.detection._torch`).
        arch_kwargs: Keyword arguments for the factory (mapping or JSON object string).
        head: ``"softmax"`` or ``"sigmoid"``; checked against the graph / layer (default: read
            from them).
        background: Where a softmax head's background column is (``"first"``: torchvision,
            ``"last"``: detectron2); required for a named softmax ONNX output.
        boxes_output: ONNX: the boxes output (``[B, N, 4]`` xyxy), with ``scores_output``.
        scores_output: ONNX: the scores output (``[B, N, K]`` after a Sigmoid or Softmax).
        class_layer: PyTorch: the class-logit layer's module name, where it is not at one of
            the known places (``roi_heads.box_predictor.cls_score``,
            ``head.classification_head.cls_logits``).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Returns:
        The loaded teacher (see :class:`~calibrate_teacher.detection.base.DetectionTeacher`).

    Raises:
        InvalidValueError: an option has a bad value or does not fit the model.
        InputError: the file is missing or not a model.
        TeacherError: the model cannot be loaded, or its class logits cannot be read.
    """
    file = Path(path)
    check_device(device)
    if head is not None and head not in _HEADS:
        raise InvalidValueError(f"head {head!r}: expected one of {', '.join(_HEADS)}")
    if background is not None and background not in _BACKGROUNDS:
        raise InvalidValueError(f"background {background!r}: expected one of {', '.join(_BACKGROUNDS)}")
    fmt = detect_format(file, arch=arch)
    if fmt == "onnx":
        from calibrate_teacher.detection import _onnx

        if class_layer is not None:
            raise InvalidValueError(f"class_layer {class_layer!r}: only for PyTorch detectors; {file.name} is ONNX")
        teacher = _onnx.load(
            file,
            device=device,
            head=head,
            background=background,
            boxes_output=boxes_output,
            scores_output=scores_output,
        )
        if arch is not None:
            teacher.notes.append(f"--arch ignored: {file.name} is ONNX and carries its own graph")
        return teacher
    if fmt in ("safetensors", "state_dict"):
        from calibrate_teacher.detection import _torch

        if boxes_output is not None or scores_output is not None:
            raise InvalidValueError(f"boxes_output/scores_output: only for ONNX detectors; {file.name} is {fmt}")
        return _torch.load(
            file,
            arch=arch,
            arch_kwargs=arch_kwargs,
            head=head,
            background=background,
            class_layer=class_layer,
            device=device,
        )
    raise TeacherError(
        f"{file}: {fmt} detection teachers are not supported; export to ONNX, or save a state dict "
        "(.safetensors / .pt) and pass --arch"
    )


def is_detection_onnx(path: str | os.PathLike[str]) -> bool:
    """True when an ONNX model looks like a detector this package reads (no session started).

    That is: ultralytics metadata ``task: detect``, or exactly one float rank-3 output whose
    elements come, through layout operators only, partly from a ``Sigmoid``.
    """
    from calibrate_teacher.detection._onnx_bypass import layout_sigmoids
    from calibrate_teacher.teachers._onnx import read_model
    from calibrate_teacher.teachers._onnx_graph import FLOAT_TYPES, value_shape

    model = read_model(Path(path))
    meta = {p.key: p.value for p in model.metadata_props}
    if meta.get("task") == "detect":
        return True
    ranked = [
        o
        for o in model.graph.output
        if o.type.tensor_type.elem_type in FLOAT_TYPES and ((s := value_shape(o)) is None or len(s) == 3)
    ]
    return len(ranked) == 1 and bool(layout_sigmoids(model, ranked[0].name)[0])
