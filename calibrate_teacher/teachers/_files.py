"""Which teacher format a file holds: chosen by suffix, confirmed by content.

Suffixes pick the candidate format and the first bytes confirm it, so a renamed or truncated file
fails here with one line that names the file and the formats we read, before any backend touches
it. Nothing here imports torch, onnx or safetensors.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from calibrate_teacher.errors import InputError, InvalidValueError
from calibrate_teacher.teachers.base import Teacher, TeacherFormat

if TYPE_CHECKING:
    import torch

#: Every suffix ``load_teacher`` accepts, and the format it points to before the content check.
SUFFIX_FORMATS: dict[str, TeacherFormat] = {
    ".onnx": "onnx",
    ".pt": "torchscript",
    ".pth": "torchscript",
    ".torchscript": "torchscript",
    ".jit": "torchscript",
    ".safetensors": "safetensors",
    ".pt2": "export",
}
TEACHER_SUFFIXES: tuple[str, ...] = tuple(SUFFIX_FORMATS)

SUPPORTED = (
    "supported teachers: .onnx (ONNX), .pt/.pth/.torchscript/.jit (TorchScript), "
    ".safetensors or a .pt/.pth state dict (with --arch), .pt2 (torch.export)"
)

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL_BYTE = 0x80


@dataclass(frozen=True)
class BakedFiles:
    """What a backend wrote into the staging folder (the model last; extra files first).

    Attributes:
        model: The baked model file.
        extra: Companion files the model needs beside it (ONNX external data).
        head: Where the temperature went: the Linear layer folded, or the ONNX tensor divided.
    """

    model: Path
    extra: tuple[Path, ...] = ()
    head: str | None = None


class BackendTeacher(Teacher, Protocol):
    """What ``baking`` needs from a loaded teacher beyond the public protocol."""

    notes: list[str]
    #: The dtype name of the model's raw output (``float32``, ``float16``...).
    precision: str

    def _probe(self, batch_size: int) -> torch.Tensor:
        """A deterministic input batch the teacher accepts (random values, known shape)."""
        ...

    def _probabilities(self, batch: torch.Tensor) -> torch.Tensor | None:
        """The model's own softmax output when it ends in one, else None."""
        ...


def check_temperature(temperature: float) -> float:
    """Return ``temperature`` as a float, refusing NaN, infinities, zero and negatives."""
    value = float(temperature)
    if not (value > 0 and value != float("inf")):
        raise InvalidValueError(
            f"temperature {temperature!r}: must be a finite number > 0 (e.g. 1.5)"
        )
    return value


def detect_format(path: str | os.PathLike[str], *, arch: str | None = None) -> TeacherFormat:
    """Return the format of the teacher file at ``path``: suffix first, then its bytes.

    A ``.pt``/``.pth`` file that is a plain PyTorch checkpoint rather than TorchScript is the
    ``"state_dict"`` format, accepted only together with ``arch``.

    Raises:
        InputError: the file is missing, has an unknown suffix, or its content does not match.
    """
    file = Path(path)
    if not file.is_file():
        what = "is a folder, not a file" if file.is_dir() else "does not exist"
        raise InputError(f"{file}: {what}; {SUPPORTED}")
    suffix = file.suffix.lower()
    if suffix not in SUFFIX_FORMATS:
        raise InputError(f"{file}: unknown teacher suffix {suffix or '(none)'!r}; {SUPPORTED}")
    with open(file, "rb") as fh:
        head = fh.read(16)
    if not head:
        raise InputError(f"{file}: the file is empty; {SUPPORTED}")
    fmt = SUFFIX_FORMATS[suffix]
    if fmt == "onnx":
        # A protobuf ModelProto written by any ONNX exporter opens with field 1 (ir_version).
        if head[0] != 0x08:
            raise InputError(f"{file}: not an ONNX model (no ModelProto header); {SUPPORTED}")
        return fmt
    if fmt == "safetensors":
        _check_safetensors_header(file, head)
        return fmt
    if fmt == "export":
        names = _zip_names(file, head, "a torch.export .pt2 archive")
        if not any(n.endswith("/archive_format") or n == "archive_format" for n in names):
            raise InputError(
                f"{file}: a zip archive but not a torch.export program (no archive_format); "
                f"{SUPPORTED}"
            )
        return fmt
    return _torch_file_format(file, head, arch=arch)


def _torch_file_format(file: Path, head: bytes, *, arch: str | None) -> TeacherFormat:
    """TorchScript, a state dict (with ``arch``), or a refusal that says why."""
    if head.startswith(_ZIP_MAGIC):
        names = _zip_names(file, head, "a TorchScript archive")
        if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
            return "torchscript"
        if any(n.endswith("/archive_format") for n in names):
            raise InputError(f"{file}: holds a torch.export program; rename it to .pt2")
        kind = "a PyTorch checkpoint (torch.save), not TorchScript"
    elif head[0] == _PICKLE_PROTOCOL_BYTE:
        kind = "a pickle (legacy torch.save format), not TorchScript"
    else:
        raise InputError(f"{file}: neither TorchScript nor a PyTorch checkpoint; {SUPPORTED}")
    if arch is None:
        raise InputError(
            f"{file}: {kind}; it is never unpickled: pass --arch pkg.module:factory to read it "
            "as a state dict (weights_only), or save the teacher with torch.jit.save / "
            "torch.export / ONNX"
        )
    return "state_dict"


def _zip_names(file: Path, head: bytes, what: str) -> list[str]:
    if not head.startswith(_ZIP_MAGIC):
        raise InputError(f"{file}: not {what} (no zip header); {SUPPORTED}")
    try:
        with zipfile.ZipFile(file) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"{file}: a damaged zip archive ({exc}); {SUPPORTED}") from exc


def _check_safetensors_header(file: Path, head: bytes) -> None:
    size = file.stat().st_size
    if len(head) < 9:
        raise InputError(f"{file}: too short to be safetensors; {SUPPORTED}")
    (n,) = struct.unpack("<Q", head[:8])
    if not 2 <= n <= size - 8 or head[8:9] != b"{":
        raise InputError(f"{file}: not a safetensors file (bad header); {SUPPORTED}")
    with open(file, "rb") as fh:
        fh.seek(8)
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{file}: not a safetensors file (header is not JSON)") from exc
    if not isinstance(header, dict):
        raise InputError(f"{file}: not a safetensors file (header is not a JSON object)")
