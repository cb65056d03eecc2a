"""TorchScript teachers: ``torch.jit.save`` archives (.pt, .pth, .torchscript, .jit).

Baking wraps the loaded module in a scripted ``TemperatureScaled`` module whose ``forward``
returns ``teacher(x) / temperature``: the original graph is untouched and the temperature is
visible as the attribute ``temperature`` of the saved module.

A module whose ``forward`` takes several tensors (``input_ids``, ``attention_mask``...) is fed
by name: the names, and which are optional (a default in the schema, e.g.
``attention_mask: Optional[Tensor] = None``), come from ``forward.schema``, which both
``torch.jit.script`` and ``torch.jit.trace`` record with the Python parameter names. The file
records no input shapes, so the load-time probe is guessed only for a text model (first layer an
``nn.Embedding``: int64 ``[2, 8]``); the bake's wrapper has the original's exact signature and is
verified on the named probe batch it is given (the real validation inputs).
"""

from __future__ import annotations

import contextlib
import re
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from calibrate_teacher._device import resolve_device
from calibrate_teacher.errors import BakeError, TeacherError
from calibrate_teacher.teachers._files import BakedFiles
from calibrate_teacher.teachers._inputs import InputPlan
from calibrate_teacher.teachers._torch import ModuleTeacher, guess_named_sample, guess_sample, one_named

if TYPE_CHECKING:
    import torch

    from calibrate_teacher.teachers.base import Inputs


@contextlib.contextmanager
def quiet_jit() -> Iterator[None]:
    """Silence torch >= 2.10's DeprecationWarning on torch.jit.load/save/script (benign here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=DeprecationWarning)
        yield


#: TorchScript operators that read or write files by name: a model has no business calling them.
_FILE_OPS = re.compile(rb"\b(from_file|_load_for_mobile|_save_for_mobile|load_library)\b")


def audit_archive(path: Path) -> None:
    """Refuse a TorchScript archive whose code calls an operator that reads files.

    TorchScript code runs in TorchScript's own interpreter (not Python: no ``import``, no
    ``os``, and its pickles build only TorchScript objects), but ``torch.from_file`` is an
    ordinary operator there and reads any path it is given.

    Raises:
        TeacherError: naming the archive and the code file.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if "/code/" in name and _FILE_OPS.search(archive.read(name)):
                    raise TeacherError(
                        f"{path}: refused: {name} calls an operator that reads or writes files "
                        "by name; calibrate-teacher never lets a model file read files outside "
                        "its folder; export the teacher without it (or to ONNX)"
                    )
    except (zipfile.BadZipFile, OSError) as exc:
        raise TeacherError(f"{path}: cannot read the TorchScript archive ({exc})") from exc


def read_module(path: Path, device: str) -> torch.jit.ScriptModule:
    """``torch.jit.load`` of an audited archive, with a one-line error for a damaged one."""
    import torch

    audit_archive(path)
    try:
        with quiet_jit():
            module: torch.jit.ScriptModule = torch.jit.load(  # type: ignore[no-untyped-call]
                str(path), map_location=device
            )
    except (RuntimeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise TeacherError(f"{path}: cannot load TorchScript ({reason})") from exc
    module.eval()
    return module


def load(
    path: Path,
    *,
    device: str,
    output: str | None,
    arch: str | None,
    arch_kwargs: Mapping[str, object] | str | None,
) -> ModuleTeacher:
    """Load a TorchScript teacher onto ``device`` (``map_location``)."""
    import torch

    where = resolve_device(device)
    module = read_module(path, where)
    notes = [f"--arch ignored: {path.name} is TorchScript and carries its own code"] if arch else []
    plan = input_plan(module)

    def call(x: Inputs) -> object:
        if isinstance(x, Mapping):
            return module(**x)
        return module(x)

    def run(x: Inputs) -> object:
        with torch.inference_mode():
            if isinstance(x, Mapping):
                return call({k: v.to(where) for k, v in x.items()})
            return call(x.to(where))

    sample: Inputs
    if plan is None:
        sample = guess_sample(module, run, file=path)
    elif len(plan.required) == 1:  # one tensor needed, the others optional: guessed as one
        (name,) = plan.required
        sample = {name: guess_sample(module, one_named(run, name), file=path)}
    else:
        sample = guess_named_sample(module, plan, run, file=path)
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    return ModuleTeacher(
        path,
        "torchscript",
        module if plan is None else call,
        device=where,
        output=output,
        input_dtype=dtype,
        sample=sample,
        notes=notes,
        plan=plan,
    )


def forward_arguments(module: torch.jit.ScriptModule) -> list[torch.Argument]:
    """The arguments of ``module.forward`` after ``self``, from its TorchScript schema."""
    schema = module.forward.schema  # type: ignore[attr-defined]  # a ScriptMethod's schema
    return list(schema.arguments[1:])


def input_plan(module: torch.jit.ScriptModule) -> InputPlan | None:
    """The named inputs of a ``forward`` with two or more tensor parameters; None for one tensor.

    Parameters of other types (``flag: bool = False``) are left to their defaults.
    """
    arguments = [a for a in forward_arguments(module) if a.type.annotation_str in _TENSOR_TYPES]
    if len(arguments) < 2:
        return None
    return InputPlan.of(
        (a.name for a in arguments),
        required=(a.name for a in arguments if not a.has_default_value()),
    )


_TENSOR_TYPES = ("Tensor", "Optional[Tensor]")


def bake(
    teacher: ModuleTeacher, temperature: float, staged: Path, *, head: str | None
) -> BakedFiles:
    """Save ``TemperatureScaled(teacher, temperature)`` as TorchScript to ``staged``."""
    import torch

    class TemperatureScaled(torch.nn.Module):
        """Returns the wrapped teacher's logits divided by ``temperature``."""

        def __init__(self, teacher: torch.nn.Module, temperature: float) -> None:
            super().__init__()
            self.teacher = teacher
            self.temperature = temperature

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            scaled: torch.Tensor = self.teacher(x) / self.temperature
            return scaled

    inner = read_module(teacher.path, "cpu")  # the baked file is saved device-neutral
    try:
        with quiet_jit():
            scripted: torch.jit.ScriptModule
            if input_plan(inner) is None:
                scripted = torch.jit.script(TemperatureScaled(inner, temperature))
            else:
                scripted = _named_wrapper(inner, temperature)
            torch.jit.save(scripted, str(staged))
    except RuntimeError as exc:
        raise BakeError(
            f"{teacher.path}: cannot wrap this TorchScript module (the wrapper needs forward(x: "
            f"Tensor) -> Tensor): {' '.join(str(exc).split())[:200]}"
        ) from exc
    return BakedFiles(staged)


def _named_wrapper(inner: torch.jit.ScriptModule, temperature: float) -> torch.jit.ScriptModule:
    """A scripted wrapper whose ``forward`` has ``inner``'s exact signature, divided by T.

    TorchScript compiles the method from source, so the wrapper keeps every parameter name,
    type and default: the baked file is fed by the same names as the original.
    """
    import torch

    arguments = forward_arguments(inner)
    params = ", ".join(
        f"{a.name}: {a.type.annotation_str}" + (f"={a.default_value!r}" if a.has_default_value() else "")
        for a in arguments
    )
    source = (
        f"def forward(self, {params}) -> Tensor:\n"
        f"    return self.teacher({', '.join(a.name for a in arguments)}) / self.temperature\n"
    )

    class TemperatureScaled(torch.jit.ScriptModule):
        """Returns the wrapped teacher's logits divided by ``temperature``, fed by name."""

        def __init__(self) -> None:
            super().__init__()
            self.teacher = inner
            self.temperature = temperature
            self.define(source)

    return TemperatureScaled()
