"""Already-preprocessed inputs stored as arrays: ``.npz``, ``.safetensors`` or ``.npy``.

Each file holds ``inputs`` ``[N, ...]`` (fed to the teacher as they are) and ``labels`` ``[N]``
(integers; -1 marks a sample without a label), or, for pre-tokenised language-model data,
``[N, S]`` token labels (-100 marks an unscored position).

Several named inputs: a ``.npz`` / ``.safetensors`` without an ``inputs`` array holds one array
per input (``input_ids``, ``attention_mask``, ``token_type_ids``, ``pixel_values``...), each
``[N, ...]``: every array but ``labels`` and ``keys`` is an input, and batches are mappings of
them, fed to a multi-input teacher by name (``description["input_fields"]`` lists them). A
file with exactly one such array (say ``x``) is read as ``inputs`` is, one tensor per batch.

- ``.npz``: arrays ``inputs`` and ``labels``, optionally ``keys`` (strings). Inputs stored
  uncompressed (``np.savez``) are memory-mapped from inside the zip and read by slices, so
  memory does not grow with N; compressed ones (``np.savez_compressed``) are read into memory
  once per process (see :mod:`~calibrate_teacher.data._npz`).
- ``.safetensors``: tensors ``inputs`` and ``labels``; the optional keys are a JSON list in the
  metadata entry ``keys``. Batches are read by slices, so memory does not grow with N.
- ``.npy``: the file is ``inputs``, memory-mapped; the labels are ``X.labels.npy`` or
  ``labels.npy`` beside it (the convention :mod:`calibrate_teacher.logits` uses too).

Without stored keys a sample's key is its index as text. Floating inputs are cast to the
teacher's input dtype where it is known, and float64 to float32 otherwise; integer inputs
(token ids) are left alone (a multi-input teacher casts each input to the dtype it declares).
:meth:`ArraySource.from_tensors` wraps tensors already in memory.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from calibrate_teacher.data._loader import Chunk, iterate
from calibrate_teacher.data._npz import member_header, open_member
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


@dataclass(frozen=True)
class _NamedChunk(Chunk):
    # A chunk of named inputs: pinned tensor by tensor (the DataLoader calls pin_memory()).
    def pin_memory(self) -> Chunk:
        named: dict[str, torch.Tensor] = self.inputs  # type: ignore[assignment]  # named inputs
        pinned = {k: v.pin_memory() for k, v in named.items()}
        return _NamedChunk(pinned, self.labels, self.indices, self.bad)  # type: ignore[arg-type]


class _ArrayReader:
    # Picklable: the open file handle / arrays are per process and rebuilt after unpickling.
    def __init__(
        self,
        path: Path | None,
        kind: str,
        labels: torch.Tensor,
        float_dtype: str | None,
        tensors: torch.Tensor | None = None,
        fields: tuple[str, ...] = ("inputs",),
        named: bool = False,
    ) -> None:
        self.path = path
        self.kind = kind
        self.labels = labels
        self.float_dtype = float_dtype
        self.fields = fields
        self.named = named
        self._inputs: dict[str, Any] | None = {fields[0]: tensors} if tensors is not None else None

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        if self.kind != "memory":
            state["_inputs"] = None
        return state

    def inputs(self) -> dict[str, Any]:
        """Each input array: numpy (memory-mapped for .npy and stored .npz), a safetensors slice, or a tensor."""
        if self._inputs is None:
            self._inputs = _open_inputs(self.path, self.kind, self.fields)
        return self._inputs

    def read(self, indices: list[int]) -> Chunk:
        import torch

        index = torch.tensor(indices, dtype=torch.int64)
        arrays = self.inputs()
        if not self.named:
            inputs = self._rows(arrays[self.fields[0]], indices)
            return Chunk(inputs=inputs, labels=self.labels[index], indices=index, bad=())
        named = {name: self._rows(arrays[name], indices) for name in self.fields}
        return _NamedChunk(inputs=named, labels=self.labels[index], indices=index, bad=())  # type: ignore[arg-type]

    def _rows(self, source: Any, indices: list[int]) -> torch.Tensor:
        import numpy as np
        import torch

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
        return inputs


def _open_inputs(path: Path | None, kind: str, fields: tuple[str, ...]) -> dict[str, Any]:
    import numpy as np

    assert path is not None  # only in-memory readers have no path, and they hold their tensors
    if kind == ".npy":
        return {fields[0]: np.load(path, mmap_mode="r", allow_pickle=False)}
    if kind == ".npz":  # memory-mapped where stored uncompressed (np.savez), else read whole
        return {name: open_member(path, name) for name in fields}
    from safetensors import safe_open

    handle = safe_open(str(path), framework="pt")
    return {name: handle.get_slice(name) for name in fields}  # type: ignore[no-untyped-call]


class ArraySource:
    """Preprocessed inputs and labels from an array file (or tensors in memory).

    Attributes:
        path: The file.
        num_classes: The number of classes, where a class list or teacher says; else None.
        class_names: Class names in label order, where given; else None.
        input_shape: The shape of one sample (several named inputs: of the first).
        dtype: The inputs' element type as stored (e.g. ``"float32"``; of the first input).
        input_fields: The arrays that hold inputs (``("inputs",)`` for one).
        named: True when batches are mappings of several named inputs.
        input_shapes: Each input's per-sample shape, by field.
        input_dtypes: Each input's stored dtype, by field.
        description: What the source is, for reports (kind, path, num_samples, input shape,
            dtype, classes, and for several inputs ``input_fields``, ``input_shapes``,
            ``input_dtypes``).
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
            header = _read_header(p, kind)
        except InputError:
            raise
        except errors as exc:
            raise InputError(
                f"{p}: cannot be read as {kind} arrays ({type(exc).__name__}: {exc})"
            ) from exc
        self._setup(p, kind, header, float_dtype, class_names, None)

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
        header = _Header(
            fields=("inputs",),
            shapes={"inputs": tuple(inputs.shape)},
            dtypes={"inputs": dtype},
            labels=labels,
            keys=tuple(keys) if keys is not None else None,
        )
        self._setup(Path(name), "memory", header, None, class_names, inputs)
        return self

    def _setup(
        self,
        path: Path,
        kind: str,
        header: _Header,
        float_dtype: str | None,
        class_names: Sequence[str] | None,
        tensors: torch.Tensor | None,
    ) -> None:
        import torch

        fields, labels, keys = header.fields, header.labels, header.keys
        shape, dtype = header.shapes[fields[0]], header.dtypes[fields[0]]
        for field in fields:
            got = header.shapes[field]
            what = "inputs" if field == "inputs" else f"input {field!r}"
            if len(got) < 2:
                raise InputError(
                    f"{path}: {what} must be [N, ...] with one row per sample, got {got}"
                )
            if got[0] != shape[0]:
                raise InputError(
                    f"{path}: {what} has {got[0]} rows but {fields[0]!r} has {shape[0]}; "
                    "every input needs one row per sample"
                )
        n = shape[0]
        # [N] class labels, or [N, S] token labels (pre-tokenised language-model data).
        if labels.ndim not in (1, 2) or labels.shape[0] != n:
            raise InputError(
                f"{path}: labels must have shape [{n}] (or [{n}, S] for token labels) to match "
                f"inputs, got {tuple(labels.shape)}"
            )
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise InputError(f"{path}: labels must be integers, got {labels.dtype}")
        labels = labels.to(torch.int64)
        if labels.ndim == 2:
            bad = labels[(labels < 0) & (labels != -100)] if labels.numel() else labels
            if bad.numel():
                raise InputError(
                    f"{path}: token labels must be token or class indices (or -100 for an "
                    f"unscored position), found {int(bad.min())}"
                )
        elif n and int(labels.min()) < -1:
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
        self.input_fields = fields
        self.named = header.named
        self.input_shapes = {f: tuple(header.shapes[f][1:]) for f in fields}
        self.input_dtypes = {f: header.dtypes[f] for f in fields}
        self.labels = labels
        self.skipped: list[tuple[str, str]] = []
        self._keys = keys
        self._reader = _ArrayReader(
            path if kind != "memory" else None, kind, labels, float_dtype, tensors,
            fields=fields, named=header.named,
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
        if header.named:
            self.description["input_fields"] = list(fields)
            self.description["input_shapes"] = {f: list(v) for f, v in self.input_shapes.items()}
            self.description["input_dtypes"] = dict(self.input_dtypes)

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


@dataclass(frozen=True)
class _Header:
    # What an array file holds: its input arrays (shapes, dtypes), labels and keys.
    fields: tuple[str, ...]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    labels: torch.Tensor
    keys: tuple[str, ...] | None
    named: bool = False


def _read_header(p: Path, kind: str) -> _Header:
    import numpy as np
    import torch

    keys: tuple[str, ...] | None = None
    if kind == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as fh:
            fields, named = _input_fields(p, list(fh.keys()))
            slices = {f: fh.get_slice(f) for f in fields}
            shapes = {f: tuple(sl.get_shape()) for f, sl in slices.items()}
            dtypes = {f: _st_dtype(sl.get_dtype()) for f, sl in slices.items()}
            labels = fh.get_tensor("labels")
            meta = fh.metadata() or {}
        if "keys" in meta:
            keys = tuple(str(k) for k in json.loads(meta["keys"]))
        return _Header(fields, shapes, dtypes, labels, keys, named)
    if kind == ".npz":
        # Our own handle: np.load(path) leaks its file when the zip turns out to be corrupt.
        with open(p, "rb") as fh, np.load(fh, allow_pickle=False) as data:
            fields, named = _input_fields(p, list(data.files))
            labels_np = data["labels"]
            if "keys" in data.files:
                keys = tuple(str(k) for k in data["keys"])
        # The inputs' shapes and dtypes from their .npy headers: no input data is read here.
        headers = {f: member_header(p, f) for f in fields}
        shapes = {f: shape for f, (shape, _) in headers.items()}
        dtypes = {f: dtype for f, (_, dtype) in headers.items()}
        return _Header(fields, shapes, dtypes, torch.from_numpy(labels_np), keys, named)
    arr = np.load(p, mmap_mode="r", allow_pickle=False)
    candidates = [p.with_name(p.stem + ".labels.npy"), p.with_name("labels.npy")]
    found = next((c for c in candidates if c.is_file() and c != p), None)
    if found is None:
        tried = " or ".join(str(c) for c in candidates)
        raise InputError(f"{p}: .npy inputs need a labels file; none found at {tried}")
    labels = torch.from_numpy(np.ascontiguousarray(np.load(found, allow_pickle=False)))
    return _Header(("inputs",), {"inputs": tuple(arr.shape)}, {"inputs": str(arr.dtype)}, labels, None)


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


def _input_fields(p: Path, present: list[str]) -> tuple[tuple[str, ...], bool]:
    """The arrays holding inputs, and whether batches are mappings of them.

    ``inputs`` when the file has it; else every array but ``labels`` and ``keys`` (named
    inputs when there are several; one such array is read as ``inputs`` is).
    """
    others = [k for k in present if k not in _NOT_INPUTS]
    missing = [n for n, gone in (("inputs", not others), ("labels", "labels" not in present)) if gone]
    if missing:
        have = ", ".join(sorted(present)) or "nothing"
        raise InputError(
            f"{p}: missing array(s) {', '.join(missing)} (the file holds: {have}); store "
            "'inputs' (or one array per named input, e.g. input_ids, attention_mask) and 'labels'"
        )
    if "inputs" in present:
        return ("inputs",), False
    return tuple(others), len(others) > 1


_NOT_INPUTS = ("labels", "keys")
