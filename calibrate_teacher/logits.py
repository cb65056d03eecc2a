"""Logit files: the interchange between a teacher run and everything after it.

A :class:`LogitSet` holds teacher logits ``[N, C]``, integer labels ``[N]`` and, optionally, one
stable key per sample. It is saved as safetensors (tensors ``logits`` and ``labels``; the keys,
if any, as a JSON list in the metadata entry ``keys``) and can also be read from ``.npz``
(arrays ``logits``, ``labels``, optional ``keys``), from a pair of ``.npy`` files
(``X.npy`` with ``X.labels.npy`` or ``labels.npy`` beside it) and from ``.pt`` files holding a
dict of tensors, which are read with ``torch.load(weights_only=True)`` only: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from calibrate_teacher._io import atomic_output
from calibrate_teacher._validate import validate_logits
from calibrate_teacher.errors import InputError, InvalidValueError

if TYPE_CHECKING:
    import torch

__all__ = ["LOGIT_SUFFIXES", "LogitSet", "load_logits", "validate_logits"]

LOGIT_SUFFIXES = (".safetensors", ".npz", ".npy", ".pt", ".pth")
FORMAT_VERSION = "1"


@dataclass(frozen=True, eq=False)
class LogitSet:
    """Teacher logits with their labels (and optional sample keys).

    Attributes:
        logits: float tensor ``[N, C]``.
        labels: int64 tensor ``[N]``.
        keys: one stable key per sample, or None.
    """

    logits: torch.Tensor
    labels: torch.Tensor
    keys: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        validate_logits(self.logits, self.labels)
        if self.keys is not None and len(self.keys) != self.logits.shape[0]:
            raise InvalidValueError(
                f"logits: {len(self.keys)} keys for {self.logits.shape[0]} samples"
            )

    @property
    def num_samples(self) -> int:
        """N, the number of samples."""
        return int(self.logits.shape[0])

    @property
    def num_classes(self) -> int:
        """C, the number of classes."""
        return int(self.logits.shape[1])

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the set (atomically) in the format its suffix names; return its path.

        ``.safetensors`` (keys in the metadata), ``.npz`` (``logits``, ``labels``, ``keys``) or
        ``.pt`` (a dict of tensors and a key list, readable with ``weights_only=True``): each
        reads back with :func:`load_logits`.

        Raises:
            OutputExistsError: ``path`` exists and ``overwrite`` is false.
            InvalidValueError: the suffix names no format that holds logits and labels.
        """
        suffix = check_save_suffix(path)
        logits = self.logits.detach().cpu().contiguous()
        labels = self.labels.detach().cpu().to(dtype=_int64()).contiguous()
        with atomic_output(path, overwrite=overwrite) as tmp:
            if suffix == ".safetensors":
                from safetensors.torch import save_file

                metadata = {"format": "calibrate-teacher.logits", "format_version": FORMAT_VERSION}
                if self.keys is not None:
                    metadata["keys"] = json.dumps(list(self.keys))
                save_file({"logits": logits, "labels": labels}, str(tmp), metadata=metadata)
            elif suffix == ".npz":
                import numpy as np

                keys = np.array(self.keys if self.keys is not None else [], dtype=str)
                with open(tmp, "wb") as fh:  # a file object: np.savez would append ".npz"
                    if self.keys is not None:
                        np.savez(fh, logits=logits.numpy(), labels=labels.numpy(), keys=keys)
                    else:
                        np.savez(fh, logits=logits.numpy(), labels=labels.numpy())
            else:
                import torch

                document: dict[str, object] = {"logits": logits, "labels": labels}
                if self.keys is not None:
                    document["keys"] = list(self.keys)
                torch.save(document, tmp)
        return Path(path)


#: The suffixes :meth:`LogitSet.save` writes (``.npy`` holds one array, so not logits + labels).
SAVE_SUFFIXES = (".safetensors", ".npz", ".pt")


def check_save_suffix(path: str | os.PathLike[str]) -> str:
    """Return the lower-case suffix of ``path`` if :meth:`LogitSet.save` can write it.

    Raises:
        InvalidValueError: naming the path and the suffixes that work.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in SAVE_SUFFIXES:
        raise InvalidValueError(
            f"{path}: cannot save logits as {suffix or 'a file without a suffix'}; "
            f"use one of {', '.join(SAVE_SUFFIXES)}"
        )
    return suffix


def _int64() -> Any:
    import torch

    return torch.int64


def load_logits(path: str | os.PathLike[str], *, labels: str | os.PathLike[str] | None = None) -> LogitSet:
    """Read a :class:`LogitSet` from ``.safetensors``, ``.npz``, ``.npy`` or ``.pt``.

    Args:
        path: The logit file.
        labels: For ``.npy`` logits only: the labels file, if not ``X.labels.npy`` or
            ``labels.npy`` beside it.

    Raises:
        InputError: the file is missing, unreadable, of an unknown type, or lacks a tensor.
        InvalidValueError: the tensors cannot be calibrated (see :func:`validate_logits`).
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    suffix = p.suffix.lower()
    if suffix not in LOGIT_SUFFIXES:
        raise InputError(
            f"{p}: unknown logit file type {suffix or '(none)'}; expected one of {', '.join(LOGIT_SUFFIXES)}"
        )
    try:
        if suffix == ".safetensors":
            logits, labs, keys = _read_safetensors(p)
        elif suffix == ".npz":
            logits, labs, keys = _read_npz(p)
        elif suffix == ".npy":
            logits, labs, keys = _read_npy(p, labels)
        else:
            logits, labs, keys = _read_pt(p)
    except _read_errors() as exc:  # a library's own parse error: name the file, keep the reason
        raise InputError(f"{p}: cannot be read as {suffix} logits ({type(exc).__name__}: {exc})") from exc
    try:
        return LogitSet(logits=logits, labels=labs, keys=keys)
    except InvalidValueError as exc:
        raise InvalidValueError(f"{p}: {str(exc).removeprefix('logits: ')}") from exc


def _read_errors() -> tuple[type[Exception], ...]:
    """What safetensors, numpy's loader, zipfile and torch.load raise for a damaged file."""
    import json
    import zipfile

    from safetensors import SafetensorError

    return (SafetensorError, OSError, ValueError, EOFError, zipfile.BadZipFile, RuntimeError, KeyError,
            json.JSONDecodeError)


def _read_safetensors(p: Path) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...] | None]:
    from safetensors import safe_open

    with safe_open(str(p), framework="pt") as fh:
        names = set(fh.keys())
        _require(p, names, ("logits", "labels"))
        logits, labels = fh.get_tensor("logits"), fh.get_tensor("labels")
        meta = fh.metadata() or {}
    keys = tuple(json.loads(meta["keys"])) if "keys" in meta else None
    return logits, labels, keys


def _read_npz(p: Path) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...] | None]:
    import numpy as np
    import torch

    with np.load(p, allow_pickle=False) as data:
        _require(p, set(data.files), ("logits", "labels"))
        logits = torch.from_numpy(np.ascontiguousarray(data["logits"]))
        labels = torch.from_numpy(np.ascontiguousarray(data["labels"]))
        keys = tuple(str(k) for k in data["keys"]) if "keys" in data.files else None
    return logits, labels, keys


def _read_npy(
    p: Path, labels: str | os.PathLike[str] | None
) -> tuple[torch.Tensor, torch.Tensor, None]:
    import numpy as np
    import torch

    candidates = [Path(labels)] if labels is not None else [
        p.with_name(p.stem + ".labels.npy"),
        p.with_name("labels.npy"),
    ]
    found = next((c for c in candidates if c.is_file() and c != p), None)
    if found is None:
        tried = " or ".join(str(c) for c in candidates)
        raise InputError(f"{p}: .npy logits need a labels file; none found at {tried}")
    logits = torch.from_numpy(np.ascontiguousarray(np.load(p, allow_pickle=False)))
    labs = torch.from_numpy(np.ascontiguousarray(np.load(found, allow_pickle=False)))
    return logits, labs, None


def _read_pt(p: Path) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...] | None]:
    import pickle
    import warnings

    import torch

    try:
        with warnings.catch_warnings():  # a plain pickle's protocol note; weights_only still decides
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise InputError(
            f"{p}: refused to unpickle: the file holds objects beyond plain tensors "
            "(only weights_only=True loading is allowed); save a dict of tensors or use .safetensors"
        ) from exc
    if not isinstance(obj, dict):
        raise InputError(f"{p}: expected a dict with 'logits' and 'labels', got {type(obj).__name__}")
    _require(p, set(obj), ("logits", "labels"))
    keys = obj.get("keys")
    return obj["logits"], obj["labels"], tuple(str(k) for k in keys) if keys is not None else None


def _require(p: Path, present: set[str], needed: tuple[str, ...]) -> None:
    missing = [n for n in needed if n not in present]
    if missing:
        have = ", ".join(sorted(present)) or "nothing"
        raise InputError(f"{p}: missing tensor(s) {', '.join(missing)} (the file holds: {have})")
