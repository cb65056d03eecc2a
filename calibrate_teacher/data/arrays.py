"""Already-preprocessed inputs stored as arrays: ``.npz``, ``.safetensors`` or ``.npy``.

Each file holds ``inputs`` ``[N, ...]`` (fed to the teacher as they are) and ``labels`` ``[N]``
(integers; -1 marks a sample without a label):

- ``.npz``: arrays ``inputs`` and ``labels``, optionally ``keys`` (strings). Read into memory
  once per process (a zip member cannot be memory-mapped).
- ``.safetensors``: tensors ``inputs`` and ``labels``; the optional keys are a JSON list in the
  metadata entry ``keys``. Batches are read by slices, so memory does not grow with N.
- ``.npy``: the file is ``inputs``, memory-mapped; the labels are ``X.labels.npy`` or
  ``labels.npy`` beside it (the convention :mod:`calibrate_teacher.logits` uses too).

Without stored keys a sample's key is its index as text. Floating inputs are cast to the
teacher's input dtype where it is known, and float64 to float32 otherwise; integer inputs
(token ids) are left alone. :meth:`ArraySource.from_tensors` wraps tensors already in memory.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from calibrate_teacher.data._loader import Chunk, iterate
from calibrate_teacher.errors import InputError

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch

    from calibrate_teacher.data.base import Batch

__all__ = ["ARRAY_SUFFIXES", "ArraySource"]

ARRAY_SUFFIXES = (".npz", ".safetensors", ".npy")


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    # Consecutive ascending stretches [a, b): one slice read each instead of one per sample.
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


class _ArrayReader:
    # Picklable: the open file handle / arrays are per process and rebuilt after unpickling.
    def __init__(
        self,
        path: Path | None,
        kind: str,
        labels: torch.Tensor,
        float_dtype: str | None,
        tensors: torch.Tensor | None = None,
    ) -> None:
        self.path = path
        self.kind = kind
        self.labels = labels
        self.float_dtype = float_dtype
        self._inputs: Any = tensors

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        if self.kind != "memory":
            state["_inputs"] = None
        return state

    def inputs(self) -> Any:
        """The inputs array: numpy (memory-mapped for .npy), a safetensors slice, or a tensor."""
        if self._inputs is None:
            self._inputs = _open_inputs(self.path, self.kind)
        return self._inputs

    def read(self, indices: list[int]) -> Chunk:
        import numpy as np
        import torch

        source = self.inputs()
        parts = []
        for a, b in _runs(indices):
            part = source[a:b]
            if isinstance(part, np.ndarray):
                # A read-only memory map must be copied (torch refuses non-writable arrays).
                part = np.ascontiguousarray(part) if part.flags.writeable else np.array(part)
                part = torch.from_numpy(part)
            parts.append(part)
        inputs = parts[0] if len(parts) == 1 else torch.cat(parts)
        if self.kind == "memory" or not inputs.is_contiguous():
            inputs = inputs.contiguous()
        if self.float_dtype is not None and inputs.is_floating_point():
            inputs = inputs.to(getattr(torch, self.float_dtype))
        index = torch.tensor(indices, dtype=torch.int64)
        return Chunk(inputs=inputs, labels=self.labels[index], indices=index, bad=())


def _open_inputs(path: Path | None, kind: str) -> Any:
    import numpy as np

    assert path is not None  # only in-memory readers have no path, and they hold their tensors
    if kind == ".npy":
        return np.load(path, mmap_mode="r", allow_pickle=False)
    if kind == ".npz":
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as data:
            return data["inputs"]
    from safetensors import safe_open

    return safe_open(str(path), framework="pt").get_slice("inputs")  # type: ignore[no-untyped-call]


class ArraySource:
    """Preprocessed inputs and labels from an array file (or tensors in memory).

    Attributes:
        path: The file.
        num_classes: The number of classes, where a class list or teacher says; else None.
        class_names: Class names in label order, where given; else None.
        input_shape: The shape of one sample.
        dtype: The inputs' element type as stored (e.g. ``"float32"``).
        description: What the source is, for reports (kind, path, num_samples, input shape,
            dtype, classes).
        skipped: Always empty (arrays have no undecodable samples); kept for symmetry.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        float_dtype: str | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        """Open an array file and check ``inputs``, ``labels`` (and ``keys``) agree.

        Args:
            path: A ``.npz``, ``.safetensors`` or ``.npy`` file.
            float_dtype: Cast floating inputs to this torch dtype name (e.g. ``"float32"``);
                None keeps them, except float64 which becomes float32.
            class_names: Class names in label order, for reports.

        Raises:
            InputError: the file is missing, unreadable, of another type, or its arrays
                are missing or disagree (shapes, label dtype, key count).
        """
        p = Path(path)
        kind = p.suffix.lower()
        if not p.is_file():
            raise InputError(f"{p}: no such file")
        if kind not in ARRAY_SUFFIXES:
            raise InputError(
                f"{p}: unknown array file type {kind or '(none)'}; "
                f"expected a folder of images or one of {', '.join(ARRAY_SUFFIXES)}"
            )
        # The parse errors numpy, zipfile and safetensors raise for a corrupt or foreign file.
        errors: tuple[type[Exception], ...] = (OSError, ValueError, EOFError, zipfile.BadZipFile)
        if kind == ".safetensors":
            from safetensors import SafetensorError

            errors += (SafetensorError,)
        try:
            shape, dtype, labels, keys = _read_header(p, kind)
        except InputError:
            raise
        except errors as exc:
            raise InputError(
                f"{p}: cannot be read as {kind} arrays ({type(exc).__name__}: {exc})"
            ) from exc
        self._setup(p, kind, shape, dtype, labels, keys, float_dtype, class_names, None)

    @classmethod
    def from_tensors(
        cls,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        *,
        keys: Sequence[str] | None = None,
        class_names: Sequence[str] | None = None,
        name: str = "<tensors>",
    ) -> ArraySource:
        """Wrap inputs ``[N, ...]`` and labels ``[N]`` already in memory.

        Raises:
            InputError: the shapes, label dtype or key count disagree.
        """
        self = cls.__new__(cls)
        dtype = str(inputs.dtype).removeprefix("torch.")
        self._setup(
            Path(name),
            "memory",
            tuple(inputs.shape),
            dtype,
            labels,
            tuple(keys) if keys is not None else None,
            None,
            class_names,
            inputs,
        )
        return self

    def _setup(
        self,
        path: Path,
        kind: str,
        shape: tuple[int, ...],
        dtype: str,
        labels: torch.Tensor,
        keys: tuple[str, ...] | None,
        float_dtype: str | None,
        class_names: Sequence[str] | None,
        tensors: torch.Tensor | None,
    ) -> None:
        import torch

        if len(shape) < 2:
            raise InputError(
                f"{path}: inputs must be [N, ...] with one row per sample, got {shape}"
            )
        n = shape[0]
        if labels.ndim != 1 or labels.shape[0] != n:
            raise InputError(
                f"{path}: labels must have shape [{n}] to match inputs, got {tuple(labels.shape)}"
            )
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise InputError(f"{path}: labels must be integers, got {labels.dtype}")
        labels = labels.to(torch.int64)
        if n and int(labels.min()) < -1:
            raise InputError(
                f"{path}: labels must be class indices (or -1 for none), found {int(labels.min())}"
            )
        if keys is not None and len(keys) != n:
            raise InputError(f"{path}: {len(keys)} keys for {n} samples")
        if keys is not None and len(set(keys)) != n:
            raise InputError(f"{path}: sample keys must be unique")
        if n == 0:
            raise InputError(f"{path}: holds no samples (N = 0)")
        if float_dtype is None and dtype == "float64":
            float_dtype = "float32"
        self.path = path
        self.class_names: tuple[str, ...] | None = tuple(class_names) if class_names else None
        self.num_classes: int | None = len(self.class_names) if self.class_names else None
        self.input_shape = tuple(shape[1:])
        self.dtype = dtype
        self.labels = labels
        self.skipped: list[tuple[str, str]] = []
        self._keys = keys
        self._reader = _ArrayReader(
            path if kind != "memory" else None, kind, labels, float_dtype, tensors
        )
        self.description: dict[str, object] = {
            "kind": "arrays",
            "path": str(path),
            "num_samples": n,
            "num_classes": self.num_classes,
            "classes": list(self.class_names) if self.class_names else None,
            "input_shape": list(self.input_shape),
            "dtype": dtype,
            "preprocess": None,
            "preprocess_from": "none: array inputs are fed as stored",
        }

    def __len__(self) -> int:
        """Return N."""
        return int(self.labels.shape[0])

    def key(self, index: int) -> str:
        """Return the stored key of sample ``index``, or the index as text."""
        return self._keys[index] if self._keys is not None else str(index)

    def batches(
        self,
        *,
        batch_size: int,
        workers: int = 0,
        pin_memory: bool = False,
        indices: Sequence[int] | None = None,
    ) -> Iterator[Batch]:
        """Yield batches in file order (or ``indices`` order), read by slices.

        Args:
            batch_size: Samples per batch.
            workers: DataLoader worker processes (0: in this process).
            pin_memory: Put inputs in page-locked memory (for a CUDA teacher).
            indices: A subset of sample positions, in the order wanted.
        """
        return iterate(
            self._reader,
            len(self),
            batch_size=batch_size,
            workers=workers,
            pin_memory=pin_memory,
            indices=indices,
            key=self.key,
            describe_bad=lambda index, reason: f"{self.path}: sample {index}: {reason}",
            skipped=None,
        )


def _read_header(
    p: Path, kind: str
) -> tuple[tuple[int, ...], str, torch.Tensor, tuple[str, ...] | None]:
    import numpy as np
    import torch

    keys: tuple[str, ...] | None = None
    if kind == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as fh:
            _require(p, set(fh.keys()))
            sl = fh.get_slice("inputs")
            shape, dtype = tuple(sl.get_shape()), _st_dtype(sl.get_dtype())
            labels = fh.get_tensor("labels")
            meta = fh.metadata() or {}
        if "keys" in meta:
            keys = tuple(str(k) for k in json.loads(meta["keys"]))
        return shape, dtype, labels, keys
    if kind == ".npz":
        # Our own handle: np.load(path) leaks its file when the zip turns out to be corrupt.
        with open(p, "rb") as fh, np.load(fh, allow_pickle=False) as data:
            _require(p, set(data.files))
            inputs = data["inputs"]
            labels_np = data["labels"]
            if "keys" in data.files:
                keys = tuple(str(k) for k in data["keys"])
        return tuple(inputs.shape), str(inputs.dtype), torch.from_numpy(labels_np), keys
    arr = np.load(p, mmap_mode="r", allow_pickle=False)
    candidates = [p.with_name(p.stem + ".labels.npy"), p.with_name("labels.npy")]
    found = next((c for c in candidates if c.is_file() and c != p), None)
    if found is None:
        tried = " or ".join(str(c) for c in candidates)
        raise InputError(f"{p}: .npy inputs need a labels file; none found at {tried}")
    labels = torch.from_numpy(np.ascontiguousarray(np.load(found, allow_pickle=False)))
    return tuple(arr.shape), str(arr.dtype), labels, None


def _st_dtype(name: str) -> str:
    names = {
        "F64": "float64",
        "F32": "float32",
        "F16": "float16",
        "BF16": "bfloat16",
        "I64": "int64",
        "I32": "int32",
        "I16": "int16",
        "I8": "int8",
        "U8": "uint8",
        "BOOL": "bool",
    }
    return names.get(name, name.lower())


def _require(p: Path, present: set[str]) -> None:
    missing = [n for n in ("inputs", "labels") if n not in present]
    if missing:
        have = ", ".join(sorted(present)) or "nothing"
        raise InputError(f"{p}: missing array(s) {', '.join(missing)} (the file holds: {have})")
