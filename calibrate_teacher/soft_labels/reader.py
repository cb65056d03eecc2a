"""Reading a soft-label cache: memory-mapped shards, random access by row or key.

Rows come back as the calibrated teacher logits ``z / T`` (float32) or as probabilities. Dense
caches give the stored row. Top-k caches keep, per row, the k largest values and the full-row
log-sum-exp ``lse``, so the kept classes' probabilities ``exp(v - lse)`` and the tail mass
``1 - sum(exp(v - lse))`` are exact; the reader spreads the tail mass evenly over the other
C - k classes (one shared logit ``lse + log(tail / (C - k))``). At the calibrated temperature the
result is exact on the kept classes and in total tail mass; at another ``temperature`` the even
spread is an approximation of the tail.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Union

from calibrate_teacher.errors import CacheError
from calibrate_teacher.soft_labels._format import KEYS_NAME, CacheManifest, ShardInfo, read_manifest
from calibrate_teacher.soft_labels._safetensors import map_arrays, parse_header

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = ["SoftLabelCache", "SoftLabelView"]

#: Row selectors accepted by views: one row, a slice, or several rows.
RowIndex = Union[int, slice, Sequence[int], "np.ndarray", "torch.Tensor"]

# A tail probability per class below this is stored as this (keeps the tail logit finite).
_TAIL_FLOOR = 1e-30


class _Shard:
    """One shard's arrays, viewed straight from a read-only memory map.

    The header is checked against the manifest (run id, shard number, rows, tensor names,
    dtypes and shapes) and, with ``verify``, the file's SHA-256 against the manifest's.
    """

    def __init__(
        self, path: Path, manifest: CacheManifest, number: int, info: ShardInfo, *, verify: bool
    ) -> None:

        tensors, meta = parse_header(path)
        size = path.stat().st_size
        if size != info.bytes or meta.get("run_id") != manifest.run_id:
            raise CacheError(
                f"{path}: does not belong to this cache (size or run id differs from "
                "manifest.json); run `calibrate-teacher inspect --verify` and re-export"
            )
        expected = _expected_tensors(manifest, info.rows)
        if set(tensors) != set(expected):
            raise CacheError(
                f"{path}: holds tensors {sorted(tensors)}, expected {sorted(expected)}; re-export the cache"
            )
        for name, (dtype_name, shape) in expected.items():
            entry = tensors[name]
            if entry.dtype != dtype_name or entry.shape != shape:
                raise CacheError(
                    f"{path}: tensor {name} is {entry.dtype} {list(entry.shape)}, expected {dtype_name} "
                    f"{list(shape)} by manifest.json; re-export the cache"
                )
        header = {"shard": str(number), "first_row": str(info.first_row), "rows": str(info.rows)}
        if any(meta.get(k) != v for k, v in header.items()):
            raise CacheError(
                f"{path}: its header says shard {meta.get('shard')}, rows {meta.get('first_row')}+"
                f"{meta.get('rows')}, but manifest.json lists it as shard {number}, rows "
                f"{info.first_row}+{info.rows}; re-export the cache"
            )
        self._map, arrays = map_arrays(
            path, tensors, size=size, sha256=info.sha256 if verify else None,
            fix="run `calibrate-teacher inspect --verify` and re-export",
        )
        self.sample_index = arrays["sample_index"]
        self.label = arrays["label"]
        self.lse = arrays["lse"]
        self.values = arrays["logits" if manifest.layout.kind == "dense" else "topk_logits"]
        self.index = arrays.get("topk_index")


def _expected_tensors(manifest: CacheManifest, rows: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Each tensor a shard of ``rows`` rows holds under the manifest's layout: dtype and shape."""
    layout = manifest.layout
    expected: dict[str, tuple[str, tuple[int, ...]]] = {
        "sample_index": ("int64", (rows,)),
        "label": ("int64", (rows,)),
        "lse": ("float32", (rows,)),
    }
    if layout.kind == "dense":
        expected["logits"] = ("float16", (rows, layout.width))
    else:
        expected["topk_logits"] = ("float16", (rows, layout.width))
        expected["topk_index"] = (str(layout.index_dtype), (rows, layout.width))
    return expected


class SoftLabelCache:
    """A complete soft-label cache, opened read-only and memory-mapped.

    ``cache[i]`` and ``cache.by_key(key)`` give the calibrated teacher's probabilities of one row
    (float32 ``[C]``); :meth:`logits` and :meth:`probs` give views that also take slices and index
    lists. Shards are mapped on first use, so opening is instant and memory stays small; the
    object can be sent to DataLoader workers (each reopens its maps).

    Each shard's SHA-256 is checked against the manifest the first time this process maps it
    (one streamed pass over the file, about as long as reading it once), as are its header and
    tensor shapes; pass ``verify=False`` to skip the checksum for a cache you trust (e.g. one
    checked with ``calibrate-teacher inspect --verify``). Objects sent to DataLoader workers
    carry which shards were already checked.

    Args:
        path: The cache folder (holding ``manifest.json``).
        verify: Check each shard's SHA-256 when it is first mapped.

    Raises:
        InputError: ``path`` is not a cache folder.
        CacheError: the manifest is incomplete or damaged (on opening), or a shard does not
            match it (on first use of that shard; the message names the file).
    """

    def __init__(self, path: str | os.PathLike[str], *, verify: bool = True) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)  # validated: shards cover 0..N-1 in order
        self.verify = verify
        m = self.manifest
        if not m.complete:
            raise CacheError(
                f"{self.path}: the cache is incomplete (its export is running or was interrupted); "
                "rerun the same export-soft-labels command to finish it"
            )
        if m.layout.unit == "token":
            raise CacheError(
                f"{self.path}: is a token soft-label cache (one row per scored token); open it with "
                "calibrate_teacher.soft_labels.TokenSoftLabelCache"
            )
        self._shards: list[_Shard | None] = [None] * m.num_shards
        self._verified: dict[int, tuple[int, int, int]] = {}  # shard -> (inode, size, mtime) checked
        self._per_shard = m.layout.shard_rows
        self._keys: tuple[str, ...] | None = None
        self._key_index: dict[str, int] | None = None

    def __getstate__(self) -> dict[str, object]:
        # Memory maps are per process: a DataLoader worker maps the shards again on first use.
        state = self.__dict__.copy()
        state["_shards"] = [None] * len(self._shards)
        state["_key_index"] = None
        return state

    def __len__(self) -> int:
        return self.manifest.num_samples

    def __repr__(self) -> str:
        m = self.manifest
        layout = "dense" if m.layout.k is None else f"top-{m.layout.k}"
        return f"SoftLabelCache({str(self.path)!r}, N={len(self)}, C={m.num_classes}, T={m.temperature:g}, {layout})"

    @property
    def num_classes(self) -> int:
        """C, the number of classes."""
        return self.manifest.num_classes

    @property
    def temperature(self) -> float:
        """The calibration temperature T the stored values were divided by."""
        return self.manifest.temperature

    @property
    def keys(self) -> tuple[str, ...]:
        """The stable sample key of every row, in row order (read from ``keys.txt`` once)."""
        if self._keys is None:
            self._keys = read_keys(self.path, len(self), unit="rows")
        return self._keys

    @property
    def labels(self) -> torch.Tensor:
        """The int64 label of every row ``[N]`` (-1 where the data had none)."""
        import numpy as np
        import torch

        parts = [self._shard(s).label for s in range(len(self._shards))]
        return torch.from_numpy(np.concatenate(parts).astype(np.int64))

    def index_of(self, key: str) -> int:
        """Return the row of a sample key.

        Raises:
            KeyError: no row has this key, or several do.
        """
        if self._key_index is None:
            index: dict[str, int] = {}
            for i, k in enumerate(self.keys):
                index[k] = -1 if k in index else i
            self._key_index = index
        row = self._key_index.get(key)
        if row is None:
            raise KeyError(f"{key!r}: no such sample key in {self.path}")
        if row < 0:
            raise KeyError(f"{key!r}: several rows of {self.path} have this key; index by row")
        return row

    def label(self, row: int) -> int:
        """Return the label of one row (-1 where the data had none)."""
        shard, offset = divmod(self._check_row(row), self.manifest.layout.shard_rows)
        return int(self._shard(shard).label[offset])

    def __getitem__(self, row: int) -> torch.Tensor:
        """Return the calibrated probabilities ``softmax(z / T)`` of one row, float32 ``[C]``."""
        return self.probs()[row]

    def by_key(self, key: str) -> torch.Tensor:
        """Return the calibrated probabilities of the row with this sample key, float32 ``[C]``."""
        return self[self.index_of(key)]

    def logits(self) -> SoftLabelView:
        """A view of the calibrated logits ``z / T`` (float32; top-k rows completed, see above)."""
        return SoftLabelView(self, temperature=None)

    def probs(self, *, temperature: float = 1.0) -> SoftLabelView:
        """A view of the probabilities ``softmax(z / (T * temperature))``.

        Args:
            temperature: An extra temperature on top of the calibrated T (1.0: the cache as fitted).
        """
        return SoftLabelView(self, temperature=temperature)

    def _check_row(self, row: int) -> int:
        n = len(self)
        r = int(row)
        if r < 0:
            r += n
        if not 0 <= r < n:
            raise IndexError(f"row {row} out of range for a cache of {n} rows")
        return r

    def _shard(self, shard: int) -> _Shard:
        opened = self._shards[shard]
        if opened is None:
            info = self.manifest.shards[shard]
            path = self.path / info.file
            try:
                st = path.stat()
            except FileNotFoundError:
                raise CacheError(f"{path}: shard missing; re-export the cache") from None
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            check = self.verify and self._verified.get(shard) != stamp
            opened = _Shard(path, self.manifest, shard, info, verify=check)
            self._verified[shard] = stamp
            self._shards[shard] = opened
        return opened

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        """Return the calibrated logits of the given rows as float32 ``[n, C]``."""
        import numpy as np

        per = self.manifest.layout.shard_rows
        shard_of = rows // per
        first = int(shard_of[0]) if rows.size else 0
        if rows.size and bool((shard_of == first).all()):  # the common case: one shard
            return self._complete(self._shard(first), rows - first * per)
        out = np.empty((rows.size, self.num_classes), dtype=np.float32)
        for shard in np.unique(shard_of):
            mask = shard_of == shard
            out[mask] = self._complete(self._shard(int(shard)), rows[mask] - int(shard) * per)
        return out

    def _one_row(self, row: int) -> np.ndarray:
        """Return the calibrated logits of one row, float32 ``[C]`` (scalar arithmetic: fast)."""
        import numpy as np

        shard_number, offset = divmod(self._check_row(row), self._per_shard)
        shard = self._shard(shard_number)
        values: np.ndarray = shard.values[offset].astype(np.float32)
        if shard.index is None:
            return values
        c, k = self.num_classes, values.shape[0]
        lse = float(shard.lse[offset])
        kept = float(np.exp(values.astype(np.float64) - lse).sum())  # as in _complete, bit for bit
        fill = min(lse + math.log(max((1.0 - kept) / (c - k), _TAIL_FLOOR)), float(values.min()))
        out = np.full(c, fill, dtype=np.float32)
        out[shard.index[offset]] = values
        return out

    def _complete(self, shard: _Shard, offsets: np.ndarray) -> np.ndarray:
        import numpy as np

        values: np.ndarray = shard.values[offsets].astype(np.float32)
        if shard.index is None:
            return values
        c, k = self.num_classes, values.shape[1]
        lse = shard.lse[offsets].astype(np.float64)
        kept = np.exp(values.astype(np.float64) - lse[:, None]).sum(axis=1)
        tail = np.maximum((1.0 - kept) / (c - k), _TAIL_FLOOR)
        fill = np.minimum(lse + np.log(tail), values.min(axis=1)).astype(np.float32)
        out = np.repeat(fill[:, None], c, axis=1)
        np.put_along_axis(out, shard.index[offsets].astype(np.int64), values, axis=1)
        return out


class SoftLabelView:
    """Rows of a :class:`SoftLabelCache` as logits or probabilities (see its ``logits``/``probs``).

    Index with an int (``[C]``), a slice, a list/array/tensor of rows (``[n, C]``), or
    :meth:`by_key`.
    """

    def __init__(self, cache: SoftLabelCache, *, temperature: float | None) -> None:
        from calibrate_teacher._validate import validate_temperature

        self.cache = cache
        self.temperature = None if temperature is None else validate_temperature(temperature)

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: RowIndex) -> torch.Tensor:
        import numpy as np
        import torch

        if isinstance(index, int | np.integer):  # the per-item path of a Dataset: keep it lean
            return self._finish(self.cache._one_row(int(index)))
        if isinstance(index, slice):
            rows = np.arange(len(self))[index]
        else:
            raw = index.cpu().numpy() if isinstance(index, torch.Tensor) else np.asarray(index)
            rows = raw.astype(np.int64).reshape(-1)
            rows = np.where(rows < 0, rows + len(self), rows)
            if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
                raise IndexError(f"row indices out of range for a cache of {len(self)} rows")
        return self._finish(self.cache._rows(rows))

    def by_key(self, key: str) -> torch.Tensor:
        """Return the row with this sample key."""
        return self[self.cache.index_of(key)]

    def _finish(self, logits: np.ndarray) -> torch.Tensor:
        import torch

        out = torch.from_numpy(logits)
        if self.temperature is None:
            return out
        return torch.softmax(out / self.temperature if self.temperature != 1.0 else out, dim=-1)


def read_keys(folder: Path, count: int, *, unit: str) -> tuple[str, ...]:
    """The ``count`` keys in ``folder/keys.txt``, one per line (``unit`` names them in the error).

    Raises:
        CacheError: the file is missing or holds another number of keys.
    """
    path = folder / KEYS_NAME
    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except FileNotFoundError:
        raise CacheError(f"{path}: missing; re-export the cache") from None
    keys = tuple(text.split("\n")[:-1])
    if len(keys) != count:
        raise CacheError(f"{path}: holds {len(keys)} keys for {count} {unit}; re-export the cache")
    return keys
