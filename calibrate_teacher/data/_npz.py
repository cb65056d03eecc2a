"""Arrays of a ``.npz`` read without loading them: memory-mapped where the zip stores them as is.

``np.load`` reads a ``.npz`` member whole (a zip member cannot be memory-mapped through
``mmap_mode``), so a large data file would be held in memory by every DataLoader worker. But
``np.savez`` stores its members uncompressed (``ZIP_STORED``): the ``.npy`` bytes of such a
member lie as they are inside the file, so :func:`open_member` maps them with ``np.memmap`` from
the member's offset, and reading a batch reads only its rows. A compressed member
(``np.savez_compressed``) is read whole, as before. :func:`member_header` gives a member's shape
and dtype from its first bytes, without reading its data.

Object arrays are refused exactly as ``np.load(allow_pickle=False)`` refuses them: nothing in a
data file is ever unpickled.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    import numpy as np

__all__ = ["member_header", "open_member"]

_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # a zip local file header, 30 bytes
_LOCAL_MAGIC = b"PK\x03\x04"


def _read_npy_header(fh: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    """(shape, fortran_order, dtype) of the ``.npy`` bytes at ``fh``'s position."""
    import numpy as np

    version = np.lib.format.read_magic(fh)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    reader = readers.get(version)
    if reader is None:
        raise ValueError(f"unsupported .npy format version {version}")
    shape, fortran, dtype = reader(fh)
    if dtype.hasobject:  # the message np.load(allow_pickle=False) gives
        raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
    return tuple(int(d) for d in shape), bool(fortran), dtype


def member_header(path: Path, name: str) -> tuple[tuple[int, ...], str]:
    """The shape and dtype name of array ``name`` in the ``.npz`` at ``path`` (data unread).

    Raises:
        ValueError: an object array, or bytes that are no ``.npy`` array.
        KeyError, zipfile.BadZipFile, OSError: no such member, or a damaged archive.
    """
    with zipfile.ZipFile(path) as archive, archive.open(f"{name}.npy") as member:
        shape, _, dtype = _read_npy_header(member)  # type: ignore[arg-type]  # a readable stream
    return shape, str(dtype)


def open_member(path: Path, name: str) -> np.ndarray:
    """Array ``name`` of the ``.npz`` at ``path``: memory-mapped when stored, else read whole.

    Raises:
        ValueError: an object array, or bytes that are no ``.npy`` array.
        KeyError, zipfile.BadZipFile, OSError: no such member, or a damaged archive.
    """
    import numpy as np

    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{name}.npy")
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:  # compressed, encrypted
            with archive.open(info) as member:
                return np.load(member, allow_pickle=False)  # type: ignore[no-any-return]
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(_LOCAL_HEADER.size)
        if len(local) != _LOCAL_HEADER.size or local[:4] != _LOCAL_MAGIC:
            raise zipfile.BadZipFile(f"{path}: bad local header for {name}.npy")
        *_, name_length, extra_length = _LOCAL_HEADER.unpack(local)
        fh.seek(info.header_offset + _LOCAL_HEADER.size + name_length + extra_length)
        shape, fortran, dtype = _read_npy_header(fh)
        offset = fh.tell()
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size == 0:  # np.memmap refuses an empty mapping
        return np.empty(shape, dtype=dtype)
    if offset + size > path.stat().st_size:
        raise ValueError(f"{name}.npy is truncated")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
