"""TorchScript teachers: ``torch.jit.save`` archives (.pt, .pth, .torchscript, .jit).

Baking wraps the loaded module in a scripted ``TemperatureScaled`` module whose ``forward``
returns ``teacher(x) / temperature``: the original graph is untouched and the temperature is
visible as the attribute ``temperature`` of the saved module.
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
from calibrate_teacher.teachers._torch import ModuleTeacher, guess_sample

if TYPE_CHECKING:
    import torch


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

    def run(x: torch.Tensor) -> object:
        with torch.inference_mode():
            return module(x.to(where))

    sample = guess_sample(module, run, file=path)
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    return ModuleTeacher(
        path,
        "torchscript",
        module,
        device=where,
        output=output,
        input_dtype=dtype,
        sample=sample,
        notes=notes,
    )


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
            scripted = torch.jit.script(TemperatureScaled(inner, temperature))
            torch.jit.save(scripted, str(staged))
    except RuntimeError as exc:
        raise BakeError(
            f"{teacher.path}: cannot wrap this TorchScript module (the wrapper needs forward(x: "
            f"Tensor) -> Tensor): {' '.join(str(exc).split())[:200]}"
        ) from exc
    return BakedFiles(staged)
