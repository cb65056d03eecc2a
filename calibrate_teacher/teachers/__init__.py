"""Teacher backends: ONNX, TorchScript, safetensors (or a state dict) + architecture, torch.export.

``load_teacher`` picks the backend by suffix, confirms it by content and returns an object that
satisfies :class:`~calibrate_teacher.teachers.base.Teacher`. Every backend returns the
*pre-softmax* logits: a model that ends in a softmax it can see (an ONNX ``Softmax`` node or the
hand-built ``Exp``/``ReduceSum``/``Div``, an ``nn.Softmax`` module, an ``aten.softmax`` node) is
read at the softmax's input, and an output whose rows are non-negative and sum to 1 with no such
softmax in sight is refused rather than calibrated as if it were logits.

Where the logits come back: ONNX teachers return CPU tensors; the PyTorch backends return them on
``teacher.device``. Half-precision outputs are widened to float32.

Each loaded teacher also has ``notes`` (a list of one-line remarks for stderr, e.g. that the
CUDA provider did not start) and ONNX teachers a ``provider`` (the execution provider in use).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

from calibrate_teacher.errors import InvalidValueError
from calibrate_teacher.teachers._files import TEACHER_SUFFIXES, BackendTeacher, detect_format
from calibrate_teacher.teachers.base import InputSpec, Teacher, TeacherFormat

__all__ = ["TEACHER_SUFFIXES", "InputSpec", "Teacher", "TeacherFormat", "load_teacher"]


def backend(fmt: TeacherFormat) -> ModuleType:
    """The module that loads and bakes ``fmt`` (each has ``load`` and ``bake``)."""
    from calibrate_teacher.teachers import _export, _onnx, _safetensors, _torchscript

    modules: dict[TeacherFormat, ModuleType] = {
        "onnx": _onnx,
        "torchscript": _torchscript,
        "safetensors": _safetensors,
        "state_dict": _safetensors,
        "export": _export,
    }
    return modules[fmt]


def open_teacher(
    path: str | os.PathLike[str],
    *,
    device: str = "auto",
    output: str | None = None,
    arch: str | None = None,
    arch_kwargs: Mapping[str, object] | str | None = None,
) -> BackendTeacher:
    """:func:`load_teacher`, typed with the private methods ``baking`` relies on."""
    if not isinstance(device, str) or not device:
        raise InvalidValueError(f"device {device!r}: expected auto, cpu, cuda or cuda:N")
    file = Path(path)
    fmt = detect_format(file, arch=arch)
    teacher: BackendTeacher = backend(fmt).load(
        file, device=device, output=output, arch=arch, arch_kwargs=arch_kwargs
    )
    return teacher


def load_teacher(
    path: str | os.PathLike[str],
    *,
    device: str = "auto",
    output: str | None = None,
    arch: str | None = None,
    arch_kwargs: Mapping[str, object] | str | None = None,
) -> Teacher:
    """Load a teacher model from a file.

    Args:
        path: ``.onnx``; ``.pt``/``.pth``/``.torchscript``/``.jit`` (TorchScript, or a state dict
            read with ``weights_only=True`` when ``arch`` is given); ``.safetensors`` (with
            ``arch``); ``.pt2`` (torch.export).
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        output: Which output holds the logits when the model has several: an ONNX output
            name, a key of a returned mapping (default ``logits``), or an index into a tuple.
        arch: The architecture for weights-only files: ``pkg.module:factory`` or
            ``path/to/file.py:factory`` (imported only when given).
        arch_kwargs: Keyword arguments for the factory, a mapping or a JSON object string.

    Returns:
        A :class:`~calibrate_teacher.teachers.base.Teacher` whose ``logits(batch)`` returns
        float pre-softmax logits ``[n, num_classes]``.

    Raises:
        InputError: the file is missing, has an unknown suffix, or its content does not match.
        TeacherError: the model cannot be loaded or run (wrong ``arch``, weights that do not
            fit it, several inputs, probabilities without a visible softmax...).
        InvalidValueError: a malformed ``device``, ``arch`` or ``arch_kwargs``.
    """
    return open_teacher(path, device=device, output=output, arch=arch, arch_kwargs=arch_kwargs)
