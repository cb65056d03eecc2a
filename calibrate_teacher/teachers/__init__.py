"""Teacher backends: ONNX, TorchScript, safetensors (or a state dict) + architecture, torch.export, Hugging Face.

``load_teacher`` picks the backend by suffix, confirms it by content (a suffix that names no
format, such as ``.bin``, is read by content alone) and returns an object that satisfies
:class:`~calibrate_teacher.teachers.base.Teacher`. Every backend returns the *pre-softmax* logits:
a model that ends in a softmax it can see (an ONNX ``Softmax`` node or the hand-built
``Exp``/``ReduceSum``/``Div``, an ``nn.Softmax`` module, an ``aten.softmax`` node) is read at the
softmax's input, and an output whose rows are non-negative and sum to 1 with no such
softmax in sight is refused rather than calibrated as if it were logits.

Where the logits come back: ONNX teachers return CPU tensors; the PyTorch backends return them on
``teacher.device``. Half-precision outputs are widened to float32.

:func:`as_teacher` adapts what a KD script already holds instead: an ``nn.Module``, or any callable
returning logits (or a tuple / mapping / ``ModelOutput`` holding them), becomes a ``"module"``
teacher (see :mod:`calibrate_teacher.teachers._memory`) that runs where the module's parameters
are and never moves it.

A folder is read as a Hugging Face model directory (format ``"hf"``: ``config.json`` + safetensors
weights, loaded with transformers' own ``from_pretrained``, offline, without remote code unless
``trust_remote_code=True``; see :mod:`calibrate_teacher.teachers._hf`).

Each loaded teacher also has ``notes`` (a list of one-line remarks for stderr, e.g. that the
CUDA provider did not start) and ONNX teachers a ``provider`` (the execution provider in use).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType

from calibrate_teacher._device import check_device
from calibrate_teacher.errors import InvalidValueError
from calibrate_teacher.teachers._files import TEACHER_SUFFIXES, BackendTeacher, content_note, detect_format
from calibrate_teacher.teachers._preprocessing import ModelLayer, find_model_classes, find_model_preprocessing
from calibrate_teacher.teachers.base import Inputs, InputSpec, Teacher, TeacherFormat

__all__ = [
    "TEACHER_SUFFIXES",
    "InputSpec",
    "Inputs",
    "ModelLayer",
    "Teacher",
    "TeacherFormat",
    "as_teacher",
    "find_model_classes",
    "find_model_preprocessing",
    "load_teacher",
]


def backend(fmt: TeacherFormat) -> ModuleType:
    """The module that loads and bakes ``fmt`` (each has ``load`` and ``bake``)."""
    from calibrate_teacher.teachers import _export, _onnx, _safetensors, _torchscript

    # "module" teachers live in memory: nothing to load from a file or bake into one.
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
    trust_remote_code: bool = False,
) -> BackendTeacher:
    """:func:`load_teacher`, typed with the private methods ``baking`` relies on."""
    check_device(device)  # before the file is even opened
    file = Path(path)
    fmt = detect_format(file, arch=arch)
    if fmt == "hf":
        return _open_directory(file, device=device, output=output, arch=arch, trust_remote_code=trust_remote_code)
    teacher: BackendTeacher = backend(fmt).load(
        file, device=device, output=output, arch=arch, arch_kwargs=arch_kwargs
    )
    note = content_note(file, fmt)
    if note is not None:  # a suffix that names no format: say what the bytes were read as
        teacher.notes.insert(0, note)
    return teacher


def _open_directory(
    folder: Path, *, device: str, output: str | None, arch: str | None, trust_remote_code: bool
) -> BackendTeacher:
    from calibrate_teacher.teachers import _hf_teacher

    if arch is not None:
        raise InvalidValueError(
            f"--arch {arch!r}: {folder} is a Hugging Face model directory, whose config.json names "
            "its architecture; drop --arch"
        )
    teacher: BackendTeacher = _hf_teacher.load(
        folder, device=device, output=output, trust_remote_code=trust_remote_code
    )
    return teacher


def load_teacher(
    path: str | os.PathLike[str],
    *,
    device: str = "auto",
    output: str | None = None,
    arch: str | None = None,
    arch_kwargs: Mapping[str, object] | str | None = None,
    trust_remote_code: bool = False,
) -> Teacher:
    """Load a teacher model from a file.

    Args:
        path: ``.onnx``; ``.pt``/``.pth``/``.torchscript``/``.jit`` (TorchScript, or a state dict
            read with ``weights_only=True`` when ``arch`` is given); ``.safetensors`` (with
            ``arch``); ``.pt2`` (torch.export). Any other suffix (``.bin``, ``.ts``, none) is
            read by its content: ``pytorch_model.bin`` as a state dict (with ``arch``),
            ``model.ts`` as TorchScript. A folder: a Hugging Face model directory
            (``config.json`` + ``model.safetensors`` or a sharded index; ``pytorch_model.bin``
            only through ``torch.load(weights_only=True)``), a sequence or image classifier.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        output: Which output holds the logits when the model has several: an ONNX output
            name, a key of a returned mapping (default ``logits``), or an index into a tuple.
        arch: The architecture for weights-only files: ``pkg.module:factory`` or
            ``path/to/file.py:factory`` (imported only when given).
        arch_kwargs: Keyword arguments for the factory, a mapping or a JSON object string.
        trust_remote_code: Hugging Face directories: allow the custom code a ``config.json``
            ``auto_map`` names (files in the directory only); refused by default.

    Returns:
        A :class:`~calibrate_teacher.teachers.base.Teacher` whose ``logits(batch)`` returns
        float pre-softmax logits ``[n, num_classes]``.

    Raises:
        InputError: the file is missing, its content is no format we read, or its suffix
            names another format than its content (the message says which to rename it to).
        TeacherError: the model cannot be loaded or run (wrong ``arch``, weights that do not
            fit it, several inputs, probabilities without a visible softmax...).
        InvalidValueError: a malformed ``device``, ``arch`` or ``arch_kwargs``.
        MissingDependencyError: a Hugging Face directory without transformers installed.
    """
    return open_teacher(
        path, device=device, output=output, arch=arch, arch_kwargs=arch_kwargs, trust_remote_code=trust_remote_code
    )


def as_teacher(
    model: Teacher | Callable[..., object],
    *,
    output: str | int | None = None,
    name: str | None = None,
) -> Teacher:
    """A loaded teacher as it is, or an in-memory module / callable adapted to :class:`Teacher`.

    Args:
        model: A :class:`Teacher`, an ``nn.Module``, or a callable returning logits (a tensor,
            or a tuple / mapping / ``ModelOutput`` holding them).
        output: Modules and callables: the key, attribute or index of the logits in the
            output; default ``logits`` (a tuple's first item).
        name: Modules and callables: the label used in messages (default ``<ClassName>``).

    Returns:
        A teacher of format ``"module"`` for a module or callable: ``device`` is where its
        parameters are, ``input_names`` its forward's parameters, and ``num_classes`` is set
        by the first batch it runs on.

    Raises:
        InvalidValueError: ``model`` is a path (use :func:`load_teacher`), or neither a teacher
            nor callable.
    """
    import torch

    from calibrate_teacher.teachers._memory import MemoryTeacher

    if isinstance(model, str | os.PathLike):
        raise InvalidValueError(f"teacher {str(model)!r}: a path; load it with load_teacher")
    if isinstance(model, torch.nn.Module):
        return MemoryTeacher(model, output=output, name=name)
    if callable(getattr(model, "logits", None)) and not callable(model):
        return model  # already a Teacher
    if callable(model):
        return MemoryTeacher(model, output=output, name=name)
    raise InvalidValueError(
        f"teacher: got {type(model).__name__}; expected a teacher file, a loaded teacher, an "
        "nn.Module or a callable returning logits"
    )
