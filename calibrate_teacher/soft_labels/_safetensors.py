"""The bytes of a shard: a safetensors file written and parsed by our own few lines.

We write shards ourselves rather than with ``safetensors.torch.save`` because the safetensors
library stores the metadata map in a random order per process, and a resumed or scaled-out
export must produce the same bytes as one uninterrupted run. The result is plain safetensors:
8-byte little-endian header length, JSON header (tensors in the order given, metadata keys
sorted, padded with spaces to a multiple of 8 bytes), then the raw little-endian data.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from calibrate_teacher.errors import CacheError
from calibrate_teacher.soft_labels._format import FORMAT, CacheManifest

if TYPE_CHECKING:
    import mmap

    import numpy as np

#: safetensors dtype codes for the numpy dtypes a shard holds.
DTYPE_CODES = {"int64": "I64", "int32": "I32", "int16": "I16", "float32": "F32", "float16": "F16"}
_CODE_DTYPES = {code: name for name, code in DTYPE_CODES.items()}


def shard_metadata(
    manifest: CacheManifest, shard: int, first_row: int, rows: int
) -> dict[str, str]:
    """Return the str -> str metadata stored in a shard's safetensors header."""
    meta = {
        "format": FORMAT,
        "format_version": str(manifest.format_version),
        "run_id": manifest.run_id,
        "shard": str(shard),
        "first_row": str(first_row),
        "rows": str(rows),
        "num_classes": str(manifest.num_classes),
        "temperature": repr(float(manifest.temperature)),
        "layout": manifest.layout.kind,
    }
    if manifest.layout.k is not None:
        meta["k"] = str(manifest.layout.k)
    if manifest.layout.unit == "token":
        meta["unit"] = "token"
    return meta


def encode_header(arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    """Return the safetensors prefix (8-byte length + JSON header) for arrays written in order.

    The header lists the tensors in the given order with contiguous offsets, the metadata with
    sorted keys, and is padded with spaces to a multiple of 8 bytes.
    """
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name, arr in arrays.items():
        header[name] = {
            "dtype": DTYPE_CODES[arr.dtype.name],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_shard_bytes(
    fh: BinaryIO, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]
) -> str:
    """Write one shard to an open file; return the SHA-256 of the bytes written."""
    digest = hashlib.sha256()
    prefix = encode_header(arrays, metadata)
    digest.update(prefix)
    fh.write(prefix)
    for arr in arrays.values():
        import numpy as np

        little = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
        if little.nbytes == 0:  # a 0-row tensor: no bytes (memoryview.cast refuses a 0 in the shape)
            continue
        view = little.data.cast("B")
        digest.update(view)
        fh.write(view)
    return digest.hexdigest()


@dataclass(frozen=True)
class TensorEntry:
    """One tensor in a safetensors header: numpy dtype name, shape, absolute byte range."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def parse_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Read a safetensors header: the tensors (absolute byte ranges) and the metadata.

    Raises:
        CacheError: the file is missing, truncated, or its header is not valid safetensors.
    """
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise CacheError(f"{path}: truncated shard (no safetensors header); re-export it")
            (length,) = struct.unpack("<Q", raw)
            if length > 100_000_000:
                raise CacheError(f"{path}: corrupt shard header (length {length}); re-export it")
            text = fh.read(length)
    except FileNotFoundError:
        raise CacheError(f"{path}: shard missing; re-export the cache") from None
    try:
        doc = json.loads(text)
        meta = {str(k): str(v) for k, v in doc.pop("__metadata__", {}).items()}
        base = 8 + length
        tensors = {
            name: TensorEntry(
                dtype=_CODE_DTYPES[entry["dtype"]],
                shape=tuple(int(d) for d in entry["shape"]),
                start=base + int(entry["data_offsets"][0]),
                end=base + int(entry["data_offsets"][1]),
            )
            for name, entry in doc.items()
        }
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CacheError(
            f"{path}: corrupt shard header ({type(exc).__name__}); re-export it"
        ) from exc
    return tensors, meta


def map_arrays(
    path: Path, tensors: Mapping[str, TensorEntry], *, size: int, sha256: str | None, fix: str
) -> tuple[mmap.mmap, dict[str, np.ndarray]]:
    """Memory-map a shard read-only and view its tensors, checking its SHA-256 when one is given.

    Args:
        path: The shard file.
        tensors: Its header's tensors (:func:`parse_header`).
        size: The file's size in bytes (each tensor must lie within it).
        sha256: The checksum the manifest lists, or None not to hash the file.
        fix: What to tell the user to do about a checksum mismatch.

    Returns:
        The map (keep it open while the views are used) and one numpy view per tensor.

    Raises:
        CacheError: a checksum mismatch, or a tensor running past the file.
    """
    import math
    import mmap

    import numpy as np

    with open(path, "rb") as fh:
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    if sha256 is not None:
        # One pass over the mapped pages (hashlib releases the GIL); they stay cached for reading.
        digest = hashlib.sha256(mapped).hexdigest()
        if digest != sha256:
            raise CacheError(
                f"{path}: checksum mismatch (manifest.json {sha256[:12]}..., file {digest[:12]}...); "
                f"the shard is corrupt or was replaced: {fix}"
            )
    arrays = {}
    for name, entry in tensors.items():
        dtype = np.dtype(entry.dtype).newbyteorder("<")
        count = math.prod(entry.shape)
        if entry.end > size or entry.end - entry.start != count * dtype.itemsize:
            raise CacheError(f"{path}: tensor {name} runs past the file (truncated?); re-export")
        arrays[name] = np.frombuffer(mapped, dtype=dtype, count=count, offset=entry.start).reshape(entry.shape)
    return mapped, arrays
