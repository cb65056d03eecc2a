"""Which teacher format a file holds: named by its suffix and confirmed by its bytes, or read by content.

Two kinds of suffix:

* **Suffixes that name a format** (:data:`SUFFIX_FORMATS`: ``.onnx``, ``.safetensors``, ``.pt2``,
  and the PyTorch ones ``.pt``/``.pth``/``.torchscript``/``.jit``, which hold TorchScript or a
  ``torch.save`` state dict): the first bytes must agree. A file whose bytes are another format
  we read is refused with one line that names what it really holds and the suffix to rename it
  to; it is not loaded anyway, because the baked copy keeps the input's suffix and would be just
  as mislabelled for the KD script that loads it by suffix.
* **Every other suffix** (``.bin``, ``.ts``, ``.model``, ``.ckpt``, none...): the format is read
  from the bytes alone (:func:`sniff_format`), and the teacher gets a note saying what it was read
  as (:func:`content_note`). ``pytorch_model.bin`` is a state dict (with ``--arch``), ``model.ts``
  TorchScript.

What the bytes say: a safetensors header (little-endian u64 length, then a JSON object); a zip
holding TorchScript's ``constants.pkl`` and ``code/`` (TorchScript), an ``archive_format`` entry
(torch.export; still audited before ``torch.export.load``), or a ``data.pkl`` (a ``torch.save``
checkpoint); a pickle (the legacy ``torch.save`` format); an ONNX ModelProto (first byte ``0x08``,
and ``onnx.load`` parses it when the suffix does not say ONNX). A ``torch.save`` checkpoint is
never unpickled: it is read only as a state dict with ``torch.load(weights_only=True)``, and only
when ``--arch`` names the architecture. Nothing here imports torch or safetensors (onnx only to
confirm a sniffed ONNX model).
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from calibrate_teacher.errors import InputError
from calibrate_teacher.teachers.base import Inputs, Teacher, TeacherFormat

if TYPE_CHECKING:
    import torch

#: The suffixes that name a format, and the format they point to before the content check.
SUFFIX_FORMATS: dict[str, TeacherFormat] = {
    ".onnx": "onnx",
    ".pt": "torchscript",
    ".pth": "torchscript",
    ".torchscript": "torchscript",
    ".jit": "torchscript",
    ".safetensors": "safetensors",
    ".pt2": "export",
}
#: The suffixes that name a format; a file with any other suffix is read by its content.
TEACHER_SUFFIXES: tuple[str, ...] = tuple(SUFFIX_FORMATS)

SUPPORTED = (
    "supported teachers: .onnx (ONNX), .pt/.pth/.torchscript/.jit (TorchScript), "
    ".safetensors or a .pt/.pth state dict (with --arch), .pt2 (torch.export), a Hugging Face "
    "model directory (config.json + model.safetensors); other suffixes (.bin, .ts, none) are "
    "read by content"
)

#: Relative tolerance of a probe check (``baked ≈ original / T``), by the model's output dtype.
PROBE_TOLERANCES: dict[str, float] = {"float64": 1e-5, "float32": 1e-5, "float16": 1e-2, "bfloat16": 5e-2}

#: What a file's bytes hold: a teacher format, or a ``torch.save`` checkpoint (a state dict).
Content = Literal["onnx", "torchscript", "safetensors", "export", "checkpoint"]

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL_BYTE = 0x80
_ONNX_FIRST_BYTE = 0x08  # a ModelProto opens with field 1 (ir_version), a varint
_TORCH_CONTENT: frozenset[Content] = frozenset({"torchscript", "checkpoint"})
_DESCRIPTIONS: dict[Content, str] = {
    "onnx": "an ONNX model",
    "torchscript": "a TorchScript archive",
    "safetensors": "safetensors weights",
    "export": "a torch.export program",
    "checkpoint": "a torch.save checkpoint",
}
_FORMAT_DESCRIPTIONS: dict[TeacherFormat, str] = {
    "onnx": "an ONNX model",
    "torchscript": "TorchScript",
    "safetensors": "safetensors weights",
    "export": "a torch.export program",
    "state_dict": "a state dict (torch.load weights_only=True)",
    "module": "an in-memory module",
    "hf": "a Hugging Face model directory",
}
#: The suffix to rename a mislabelled file to, by what it holds.
_RENAME: dict[Content, str] = {
    "onnx": ".onnx",
    "torchscript": ".pt",
    "safetensors": ".safetensors",
    "export": ".pt2",
    "checkpoint": ".pth",
}


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
    #: The batch sizes the model runs on, (fewest, most or None) rows; None for any. Other
    #: batches run in chunks of a size it takes (a static-batch ``.pt2`` or ONNX graph).
    batch_rows: tuple[int, int | None] | None

    def _probe(self, batch_size: int) -> Inputs:
        """A deterministic input batch the teacher accepts (named inputs where it takes several)."""
        ...

    def _probabilities(self, batch: Inputs) -> torch.Tensor | None:
        """The model's own softmax output when it ends in one, else None."""
        ...


def detect_format(path: str | os.PathLike[str], *, arch: str | None = None) -> TeacherFormat:
    """Return the format of the teacher file at ``path``: the suffix confirmed by its bytes.

    A suffix that names a format must agree with the bytes; any other suffix (``.bin``,
    ``.ts``, none...) is read by content (see the module docstring). A ``torch.save``
    checkpoint is the ``"state_dict"`` format, accepted only together with ``arch``.

    A directory is ``"hf"`` when its ``config.json`` is one transformers wrote (see
    :func:`~calibrate_teacher.teachers._hf.is_hf_directory`); its weights and safety are checked
    when it is opened.

    Raises:
        InputError: the file is missing or empty, its bytes hold another format than its suffix
            names (the message says which, and the suffix to rename it to), or no format we read;
            a directory that is no Hugging Face model.
    """
    file = Path(path)
    if file.is_dir():
        return _directory_format(file)
    head = _head(file)
    suffix = file.suffix.lower()
    named = SUFFIX_FORMATS.get(suffix)
    if named is None:
        content = sniff_format(file, head)
        if content is None:
            raise InputError(
                f"{file}: the suffix {suffix or '(none)'!r} names no format we read and the bytes "
                f"are none of ONNX, TorchScript, torch.export, safetensors or a torch.save "
                f"checkpoint; {SUPPORTED}"
            )
        return _as_format(file, content, arch=arch)
    if named == "onnx" and head[0] == _ONNX_FIRST_BYTE:
        return "onnx"  # the backend parses it, with its own error for a damaged model
    content = sniff_format(file, head, onnx_header_only=False)
    if named == "torchscript" and content in _TORCH_CONTENT:
        return _as_format(file, content, arch=arch)
    if content == named:
        return named
    if content is not None:
        raise InputError(
            f"{file}: named {suffix} but holds {_DESCRIPTIONS[content]}; rename it to "
            f"{file.with_suffix(_RENAME[content]).name}"
            + (" (and pass --arch)" if content in ("checkpoint", "safetensors") else "")
        )
    # The bytes are nothing we read: say what the suffix promised and what is wrong with it.
    if named == "onnx":
        raise InputError(f"{file}: not an ONNX model (no ModelProto header); {SUPPORTED}")
    if named == "safetensors":
        _check_safetensors_header(file, head)
    if named == "export":
        _zip_names(file, head, "a torch.export .pt2 archive")
        raise InputError(
            f"{file}: a zip archive but not a torch.export program (no archive_format); {SUPPORTED}"
        )
    raise InputError(f"{file}: neither TorchScript nor a PyTorch checkpoint; {SUPPORTED}")


def sniff_format(file: Path, head: bytes | None = None, *, onnx_header_only: bool = False) -> Content | None:
    """What the bytes of ``file`` hold, whatever its suffix; None for nothing we read.

    ``head`` is the file's first bytes (read when not given). An ONNX model is confirmed with
    ``onnx.load`` unless ``onnx_header_only``.

    Raises:
        InputError: a damaged zip archive.
    """
    head = _head(file) if head is None else head
    if _is_safetensors(file, head):
        return "safetensors"
    if head.startswith(_ZIP_MAGIC):
        names = _zip_names(file, head, "a zip archive")
        if any(n.rsplit("/", 1)[-1] == "archive_format" for n in names):
            return "export"
        if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
            return "torchscript"
        if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
            return "checkpoint"
        return None
    if head[0] == _PICKLE_PROTOCOL_BYTE:
        return "checkpoint"
    if head[0] == _ONNX_FIRST_BYTE and (onnx_header_only or _parses_as_onnx(file)):
        return "onnx"
    return None


def content_note(path: str | os.PathLike[str], fmt: TeacherFormat) -> str | None:
    """The note for a teacher read by its content (a suffix that names no format), else None."""
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix in SUFFIX_FORMATS:
        return None
    what = _FORMAT_DESCRIPTIONS[fmt]
    return f"{file.name}: read by its content as {what} (the suffix {suffix or '(none)'!r} names no format)"


def _directory_format(folder: Path) -> TeacherFormat:
    from calibrate_teacher.teachers._hf import is_hf_directory

    if is_hf_directory(folder):
        return "hf"
    why = (
        "its config.json names no model_type or architectures"
        if (folder / "config.json").is_file()
        else "it has no config.json"
    )
    raise InputError(
        f"{folder}: a folder, but not a Hugging Face model directory ({why}); give a model file, "
        f"or a save_pretrained folder; {SUPPORTED}"
    )


def _head(file: Path) -> bytes:
    if not file.is_file():
        if file.is_dir():
            what = "is a folder, not a file"
        elif file.exists():  # a FIFO or device would block the first read
            what = "is not a regular file (a pipe, socket or device)"
        else:
            what = "does not exist"
        raise InputError(f"{file}: {what}; {SUPPORTED}")
    with open(file, "rb") as fh:
        head = fh.read(16)
    if not head:
        raise InputError(f"{file}: the file is empty; {SUPPORTED}")
    return head


def _as_format(file: Path, content: Content, *, arch: str | None) -> TeacherFormat:
    """The teacher format for ``content``; a checkpoint is a state dict, and only with ``arch``."""
    if content != "checkpoint":
        return content
    if arch is None:
        raise InputError(
            f"{file}: a PyTorch checkpoint (torch.save) holding weights, not code; it is never unpickled: "
            "pass --arch pkg.module:factory to read it as a state dict (weights_only), or save "
            "the teacher with torch.jit.save / torch.export / ONNX"
        )
    return "state_dict"


def _parses_as_onnx(file: Path) -> bool:
    """True when ``onnx.load`` (without external data) reads a graph with nodes from ``file``."""
    import onnx
    from google.protobuf.message import DecodeError  # type: ignore[import-untyped, unused-ignore]

    try:
        model = onnx.load(str(file), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError):
        return False
    return bool(model.graph.node) and bool(model.graph.output)


def _zip_names(file: Path, head: bytes, what: str) -> list[str]:
    if not head.startswith(_ZIP_MAGIC):
        raise InputError(f"{file}: not {what} (no zip header); {SUPPORTED}")
    try:
        with zipfile.ZipFile(file) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"{file}: a damaged zip archive ({exc}); {SUPPORTED}") from exc


def _is_safetensors(file: Path, head: bytes) -> bool:
    try:
        _check_safetensors_header(file, head)
    except InputError:
        return False
    return True


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
