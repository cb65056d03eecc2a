"""One shard's work: run the producer over its rows, then write it and its receipt atomically.

The writer (``writer.py``) decides which shards to do; this module does one. A shard is finished
once its hidden receipt ``.shard-NNNNN.receipt.json`` (size, checksum, keys) is in place: the
shard file is renamed into place before it, so a receipt always describes a complete file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from calibrate_teacher._io import replaced
from calibrate_teacher.errors import CacheError, InvalidValueError, OutputError
from calibrate_teacher.soft_labels._format import FP16_MAX, CacheManifest, receipt_name, shard_name
from calibrate_teacher.soft_labels._output import os_error_fix
from calibrate_teacher.soft_labels._safetensors import shard_metadata, write_shard_bytes

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = [
    "BatchProducer",
    "RowBatch",
    "ShardComputer",
    "compute_shard",
    "fsync_dir",
    "persist_shard",
    "read_receipt",
    "replacing",
    "shard_done",
    "shard_rows_of",
    "writing",
]

#: Batches handed to the worker thread but not yet stored (bounds memory to a few batches).
_MAX_INFLIGHT = 4


class RowBatch(Protocol):
    """What the writer needs from a batch (``calibrate_teacher.collect.LogitBatch`` fits)."""

    @property
    def indices(self) -> torch.Tensor:
        """int64 row positions ``[n]``."""
        ...

    @property
    def logits(self) -> torch.Tensor:
        """Raw teacher logits ``[n, C]`` (not yet divided by T)."""
        ...

    @property
    def labels(self) -> torch.Tensor:
        """int64 labels ``[n]`` (-1: unlabelled)."""
        ...

    @property
    def keys(self) -> tuple[str, ...]:
        """One stable sample key per row."""
        ...


#: Given row positions, yield their batches in that order (e.g. ``iter_logits(..., indices=rows)``).
BatchProducer = Callable[[Sequence[int]], Iterable[RowBatch]]

#: (producer, manifest, shard, progress, worker pool) -> the shard's arrays (in file order) and keys.
ShardComputer = Callable[
    [Any, CacheManifest, int, "Callable[[int], None] | None", Executor],
    "tuple[dict[str, np.ndarray], list[str]]",
]


def shard_rows_of(manifest: CacheManifest, shard: int) -> int:
    """Rows in shard number ``shard`` (all but the last hold ``shard_rows``)."""
    first = shard * manifest.layout.shard_rows
    return min(manifest.layout.shard_rows, manifest.num_samples - first)


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[BinaryIO]:
    """Write ``path`` atomically (:func:`calibrate_teacher._io.replaced`) through a binary handle."""
    with replaced(path) as tmp, open(tmp, "wb") as fh:
        yield fh


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn a failed write (no space left, read-only, permission denied...) into an OutputError.

    The message names the file and what to do; what was finished before stays resumable.
    """
    try:
        yield
    except OSError as exc:
        where = exc.filename if isinstance(exc.filename, str) and not exc.filename.endswith(".tmp") else path
        raise OutputError(
            f"{where}: {exc.strerror or exc} while writing the cache; {os_error_fix(exc)}, then rerun "
            "the same command to resume"
        ) from exc


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries, so renames in it survive a crash (no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_receipt(folder: Path, shard: int) -> dict[str, object] | None:
    """The receipt of a finished shard, or None."""
    try:
        doc = json.loads((folder / receipt_name(shard)).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def shard_done(folder: Path, shard: int, manifest: CacheManifest) -> bool:
    """True when the shard has a receipt of this run and its file has the recorded size."""
    receipt = read_receipt(folder, shard)
    if receipt is None or receipt.get("run_id") != manifest.run_id:
        return False
    path = folder / shard_name(shard)
    return path.is_file() and path.stat().st_size == receipt.get("bytes")


def compute_shard(
    produce: BatchProducer,
    manifest: CacheManifest,
    shard: int,
    progress: Callable[[int], None] | None,
    pool: Executor,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Run the producer over one shard's rows; return the shard's arrays and keys.

    Each batch is divided by T, reduced and stored by ``pool`` (one worker thread: torch
    releases the GIL) while this thread asks the producer, i.e. the teacher, for the next one.
    """
    from concurrent.futures import wait

    import numpy as np

    layout = manifest.layout
    first = shard * layout.shard_rows
    rows = shard_rows_of(manifest, shard)
    arrays: dict[str, np.ndarray] = {
        "sample_index": np.arange(first, first + rows, dtype=np.int64),
        "label": np.empty(rows, dtype=np.int64),
        "lse": np.empty(rows, dtype=np.float32),
    }
    index_dtype = layout.index_dtype
    if layout.kind == "topk" and index_dtype == "int32":
        arrays["topk_index"] = np.empty((rows, layout.width), dtype=np.int32)
    arrays["logits" if layout.kind == "dense" else "topk_logits"] = np.empty(
        (rows, layout.width), dtype=np.float16
    )
    if layout.kind == "topk" and index_dtype == "int16":
        arrays["topk_index"] = np.empty((rows, layout.width), dtype=np.int16)

    keys: list[str] = []
    filled = 0
    inflight: deque[Future[int]] = deque()
    try:
        for batch in produce(range(first, first + rows)):
            n = int(batch.logits.shape[0])
            keys.extend(_check_keys(batch.keys, n, first + filled))
            inflight.append(
                pool.submit(_store_batch, batch, arrays, manifest, offset=filled, first=first, rows=rows)
            )
            filled += n
            if progress is not None:
                progress(n)
            while len(inflight) > _MAX_INFLIGHT:  # back-pressure: a few batches in memory at most
                inflight.popleft().result()
    except BaseException:
        wait(inflight)  # nothing may still write into the arrays once we leave
        raise
    for done in inflight:
        done.result()
    if filled != rows:
        raise CacheError(
            f"shard {shard}: the data source yielded {filled} of rows {first}..{first + rows - 1}; "
            "was the data changed during the export?"
        )
    return arrays, keys


def persist_shard(
    folder: Path, manifest: CacheManifest, shard: int, arrays: dict[str, np.ndarray], keys: list[str]
) -> None:
    """Write one shard, then its receipt (which marks it finished)."""
    first = shard * manifest.layout.shard_rows
    rows = shard_rows_of(manifest, shard)
    metadata = shard_metadata(manifest, shard, first, rows)
    path = folder / shard_name(shard)
    with writing(path), replacing(path) as fh:
        digest = write_shard_bytes(fh, arrays, metadata)
        size = fh.tell()
    receipt = {
        "run_id": manifest.run_id,
        "shard": shard,
        "first_row": first,
        "rows": rows,
        "bytes": size,
        "sha256": digest,
        "keys": keys,
    }
    if manifest.layout.unit == "token":
        receipt["tokens"] = int(arrays["lse"].shape[0])
    with writing(path), replacing(folder / receipt_name(shard)) as fh:
        fh.write(json.dumps(receipt).encode("utf-8"))
    fsync_dir(folder)


def _store_batch(
    batch: RowBatch,
    arrays: dict[str, np.ndarray],
    manifest: CacheManifest,
    *,
    offset: int,
    first: int,
    rows: int,
) -> int:
    """Divide one batch by T and store it in the shard arrays at ``offset``; return its size."""
    import torch

    layout = manifest.layout
    logits = batch.logits.detach().to("cpu", torch.float32)
    n = int(logits.shape[0])
    start = first + offset
    indices = batch.indices.detach().cpu().to(torch.int64)
    if (
        logits.ndim != 2
        or logits.shape[1] != layout.num_classes
        or offset + n > rows
        or not torch.equal(indices, torch.arange(start, start + n))
    ):
        raise CacheError(
            f"the teacher/data returned a batch of shape {tuple(logits.shape)} for rows "
            f"{indices[:1].tolist()}..., expected [n, {layout.num_classes}] for rows from {start}; "
            "the data or teacher changed during the export"
        )
    scaled = logits / manifest.temperature
    # One reduction checks both: NaN propagates through aminmax, and Inf exceeds float16's range.
    low, high = (float(v) for v in torch.aminmax(scaled))
    if not (math.isfinite(low) and math.isfinite(high)):
        bad = int((~torch.isfinite(scaled)).any(dim=1).nonzero()[0])
        raise InvalidValueError(
            f"sample {batch.keys[bad]!r} (row {start + bad}): the teacher returned NaN or Inf "
            "logits; check the teacher and its input"
        )
    peak = max(-low, high)
    if peak > FP16_MAX:
        raise InvalidValueError(
            f"rows {start}..{start + n - 1}: logits / T reach {peak:.4g}, beyond float16's range "
            f"({FP16_MAX:g}); use a larger --temperature or check the teacher"
        )
    # Write straight into the shard's arrays (torch views of them): no temporary copies.
    stop = offset + n
    view = {name: torch.from_numpy(array[offset:stop]) for name, array in arrays.items()}
    torch.logsumexp(scaled, dim=1, out=view["lse"])
    view["label"].copy_(batch.labels.detach())
    if layout.kind == "dense":
        view["logits"].copy_(scaled)  # float32 -> float16, rounded to nearest
    else:
        values, index = torch.topk(scaled, int(layout.width), dim=1)
        view["topk_logits"].copy_(values)
        view["topk_index"].copy_(index)
    return n


def _check_keys(keys: Sequence[str], n: int, start: int) -> Sequence[str]:
    if len(keys) != n:
        raise CacheError(f"rows from {start}: {len(keys)} keys for {n} rows from the data source")
    for i, key in enumerate(keys):
        if "\n" in key or "\r" in key:
            raise InvalidValueError(
                f"sample key {key!r} (row {start + i}) holds a line break; "
                "keys.txt keeps one key per line"
            )
        try:  # as _finish will write it: checked now, not after the last shard
            key.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raise InvalidValueError(
                f"sample key {key!r} (row {start + i}) holds a lone surrogate that UTF-8 cannot "
                "store; give keys that are text or file names"
            ) from None
    return keys
