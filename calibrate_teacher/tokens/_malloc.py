"""Keep glibc from hoarding the freed logit chunks of the token passes.

glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which
blocks that size come from the heap; with torch's intra-op threads the heap then fragments and
the resident memory of a pass over tens of thousands of ``[rows, V]`` chunks grew by gigabytes
on a 2-thread CPU here (measured: +1 GiB for one Newton pass over 4k tokens x 32k vocabulary, +28
MiB with a fixed threshold). Fixing the threshold at 1 MiB (``mallopt(M_MMAP_THRESHOLD)``, the
same as ``MALLOC_MMAP_THRESHOLD_=1048576``) makes every chunk an mmap that is returned on free.
It is process-wide, so it is done once, only on glibc, and never where the user set the variable.
"""

from __future__ import annotations

import os

_M_MMAP_THRESHOLD = -3
_THRESHOLD = 1 << 20
_done: bool | None = None


def fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at 1 MiB (once per process); True where it is (now or before) in force."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return _done
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        _done = bool(libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD))
    except (OSError, AttributeError):
        _done = False
    return _done
