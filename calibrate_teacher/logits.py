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
from calibrate_teacher.errors import InputError, InvalidValueError

if TYPE_CHECKING:
    import torch

__all__ = ["LOGIT_SUFFIXES", "LogitSet", "load_logits", "validate_logits"]

LOGIT_SUFFIXES = (".safetensors", ".npz", ".npy", ".pt", ".pth")
FORMAT_VERSION = "1"


def validate_logits(logits: torch.Tensor, labels: torch.Tensor, *, name: str = "logits") -> None:
    """Check that ``logits`` [N, C] and ``labels`` [N] can be calibrated.

    Raises:
        InvalidValueError: wrong shapes or dtypes, N = 0, C < 2, NaN/Inf logits, labels out of range.
    """
    import torch

    if logits.ndim != 2:
        raise InvalidValueError(f"{name}: expected a 2-D [N, C] logit matrix, got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise InvalidValueError(f"{name}: expected floating-point logits, got {logits.dtype}")
    n, c = logits.shape
    if n == 0:
        raise InvalidValueError(f"{name}: holds no samples (N = 0)")
    if c < 2:
        raise InvalidValueError(f"{name}: needs at least 2 classes, got C = {c}")
    if labels.ndim != 1 or labels.shape[0] != n:
        raise InvalidValueError(
            f"{name}: labels must have shape [{n}] to match the logits, got {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise InvalidValueError(f"{name}: labels must be integers, got {labels.dtype}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= c:
        raise InvalidValueError(f"{name}: labels must lie in [0, {c - 1}], found values from {lo} to {hi}")
    finite = torch.isfinite(logits)
    if not bool(finite.all()):
        bad = int((~finite).any(dim=1).nonzero()[0])
        count = int((~finite).any(dim=1).sum())
        raise InvalidValueError(
            f"{name}: {count} row(s) hold NaN or Inf logits (first at row {bad}); "
            "check the teacher's outputs"
        )


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
        """Write the set as a safetensors file (atomically); return its path.

        Raises:
            OutputExistsError: ``path`` exists and ``overwrite`` is false.
        """
        from safetensors.torch import save_file

        metadata = {"format": "calibrate-teacher.logits", "format_version": FORMAT_VERSION}
        if self.keys is not None:
            metadata["keys"] = json.dumps(list(self.keys))
        tensors = {
            "logits": self.logits.detach().cpu().contiguous(),
            "labels": self.labels.detach().cpu().to(dtype=_int64()).contiguous(),
        }
        with atomic_output(path, overwrite=overwrite) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return Path(path)


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
    except (InputError, InvalidValueError):
        raise
    except Exception as exc:  # a library's own parse error: name the file, keep the reason
        raise InputError(f"{p}: cannot be read as {suffix} logits ({type(exc).__name__}: {exc})") from exc
    try:
        return LogitSet(logits=logits, labels=labs, keys=keys)
    except InvalidValueError as exc:
        raise InvalidValueError(f"{p}: {str(exc).removeprefix('logits: ')}") from exc


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

    import torch

    try:
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
