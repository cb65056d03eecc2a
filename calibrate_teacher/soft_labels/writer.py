"""Writing a soft-label cache: shard by shard, resumable, and shared between torchrun ranks.

Rows are cut into shards of ``shard_rows`` fixed by position (shard ``s`` holds rows
``[s * shard_rows, (s + 1) * shard_rows)``), and shard ``s`` is written by rank ``s % world_size``.
Each shard asks the producer for exactly its rows, so its bytes do not depend on how many
processes ran or where an earlier run was interrupted.

A shard is finished once its hidden receipt (checksum + keys) exists; the shard file itself is
renamed into place first. A rerun skips finished shards. Once every shard is finished, rank 0
writes ``keys.txt`` and the complete ``manifest.json``, then removes the receipts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from calibrate_teacher._distributed import DistributedContext
from calibrate_teacher.errors import CacheError, InputError, InvalidValueError, OutputExistsError
from calibrate_teacher.soft_labels._format import (
    KEYS_NAME,
    MANIFEST_NAME,
    CacheLayout,
    CacheManifest,
    Calibration,
    ShardInfo,
    read_manifest,
    receipt_name,
    run_id,
    shard_name,
)
from calibrate_teacher.soft_labels._shards import (
    BatchProducer,
    RowBatch,
    compute_shard,
    fsync_dir,
    persist_shard,
    read_receipt,
    replacing,
    shard_done,
    shard_rows_of,
)

__all__ = [
    "DEFAULT_SHARD_ROWS",
    "BatchProducer",
    "RowBatch",
    "choose_layout",
    "refuse_complete_cache",
    "write_soft_labels",
]

DEFAULT_SHARD_ROWS = 16384
#: Above this many classes the default layout keeps only the top 10 of each row.
DENSE_MAX_CLASSES = 1000
DEFAULT_TOP_K = 10


def choose_layout(num_classes: int, top_k: int | None, shard_rows: int) -> CacheLayout:
    """Pick dense or top-k storage.

    Args:
        num_classes: C.
        top_k: None: dense when C <= 1000, else the top 10; 0: dense; 1 <= K < C: the top K.
        shard_rows: Rows per shard.

    Raises:
        InvalidValueError: C < 2, K < 0 or K >= C, or shard_rows < 1.

    >>> choose_layout(10, None, 100).kind, choose_layout(5000, None, 100).k
    ('dense', 10)
    """
    if num_classes < 2:
        raise InvalidValueError(
            f"num_classes {num_classes}: a soft-label cache needs at least 2 classes"
        )
    if shard_rows < 1:
        raise InvalidValueError(f"--shard-rows {shard_rows}: must be at least 1")
    if top_k is None:
        top_k = 0 if num_classes <= DENSE_MAX_CLASSES else DEFAULT_TOP_K
    if top_k < 0 or top_k >= num_classes:
        raise InvalidValueError(
            f"--top-k {top_k}: must lie in [1, {num_classes - 1}] for {num_classes} classes; "
            "use --top-k 0 for dense rows"
        )
    if top_k == 0:
        return CacheLayout(kind="dense", k=None, num_classes=num_classes, shard_rows=shard_rows)
    return CacheLayout(kind="topk", k=top_k, num_classes=num_classes, shard_rows=shard_rows)


def write_soft_labels(
    produce: BatchProducer,
    out: str | os.PathLike[str],
    *,
    num_samples: int,
    num_classes: int,
    temperature: float | Calibration,
    teacher: Mapping[str, object] | None = None,
    data: Mapping[str, object] | None = None,
    top_k: int | None = None,
    shard_rows: int = DEFAULT_SHARD_ROWS,
    overwrite: bool = False,
    resume: bool = True,
    context: DistributedContext | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CacheManifest:
    """Write the calibrated soft labels ``logits / T`` of ``num_samples`` rows as a cache folder.

    Memory is two shards' worth (one computed, one being written), whatever ``num_samples``
    is. Run once per rank under torchrun (pass ``context``): each rank writes its shards and
    rank 0 writes the manifest at the end.

    Args:
        produce: Yields the batches for the given row positions, in that order.
        out: The cache folder (created; an unfinished cache there is resumed).
        num_samples: N, the number of rows.
        num_classes: C, the width of each logit row.
        temperature: T, or a :class:`Calibration` that also says how T was chosen.
        teacher: What the manifest records about the teacher (file, sha256, format...).
        data: The data source's description (recorded, and compared when resuming).
        top_k: Storage layout, see :func:`choose_layout`.
        shard_rows: Rows per shard.
        overwrite: Replace a complete cache at ``out``.
        resume: Continue an unfinished cache of the same teacher, data, T and layout (False:
            start over).
        context: This process's rank and world size (default: one process).
        progress: Called with (rows just computed, rows this rank has to do) after each batch,
            and once with (0, rows to do) before the first.

    Returns:
        The complete manifest (on every rank).

    Raises:
        OutputExistsError: ``out`` holds a complete cache and ``overwrite`` is false.
        CacheError: ``out`` holds an unfinished cache of another teacher/data/T/layout, or the
            producer returned rows other than those asked for.
        InputError: ``out`` is a file, or a non-empty folder that is not a cache.
        InvalidValueError: bad T, top_k, shard_rows, N, or non-finite / fp16-overflowing logits.
    """
    ctx = context or DistributedContext()
    calibration = temperature if isinstance(temperature, Calibration) else Calibration(temperature)
    layout = choose_layout(num_classes, top_k, shard_rows)
    if num_samples < 1:
        raise InvalidValueError(f"num_samples {num_samples}: the data holds no samples to export")
    # JSON-normalised now (tuples -> lists...), so they compare equal to what a rerun reads back
    teacher_block = _as_json({**dict(teacher or {}), "num_classes": num_classes})
    data_block = _as_json(
        {
            "source": dict(data) if data is not None else None,
            "num_samples": num_samples,
            "order_sha256": None,
        }
    )
    manifest = CacheManifest(
        teacher=teacher_block,
        data=data_block,
        calibration=calibration,
        layout=layout,
        run_id=run_id(teacher_block, data_block, calibration.temperature, layout),
    )
    folder = Path(out)
    state = _existing_state(folder, manifest, overwrite=overwrite, resume=resume)
    ctx.barrier()  # every rank has looked before rank 0 changes anything
    if ctx.is_main:
        _prepare(folder, manifest, restart=state == "restart", fresh=state != "resume")
    ctx.barrier()

    mine = range(ctx.rank, manifest.num_shards, ctx.world_size)
    todo = [s for s in mine if not shard_done(folder, s, manifest)]
    total = sum(shard_rows_of(manifest, s) for s in todo)
    if progress is not None:
        progress(0, total)
    step = (lambda n: progress(n, total)) if progress is not None else None
    # Three threads overlap: this one runs the teacher, `compute` divides by T and stores each
    # batch, `disk` hashes, writes and fsyncs the previous shard (torch and I/O release the
    # GIL). At most two shards are in memory; leaving the block, even on an error, waits for
    # the shard being written, so it is finished with its receipt.
    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="soft-labels-compute") as compute,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="soft-labels-disk") as disk,
    ):
        pending: Future[None] | None = None
        for shard in todo:
            arrays, keys = compute_shard(produce, manifest, shard, step, compute)
            if pending is not None:
                pending.result()
            pending = disk.submit(persist_shard, folder, manifest, shard, arrays, keys)
        if pending is not None:
            pending.result()

    ctx.barrier()
    if ctx.is_main:
        _finish(folder, manifest)
    ctx.barrier()
    return read_manifest(folder)


def _as_json(block: Mapping[str, object]) -> dict[str, object]:
    try:
        value: dict[str, object] = json.loads(json.dumps(block, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidValueError(f"teacher/data description is not JSON-serialisable ({exc})") from exc
    return value


def refuse_complete_cache(folder: Path, *, overwrite: bool) -> None:
    """Raise when ``folder`` holds a complete cache and ``overwrite`` is false.

    Receipts left in a complete cache (a run killed just after finishing) are removed first.

    Raises:
        OutputExistsError: as above.
    """
    if overwrite or not (folder / MANIFEST_NAME).is_file():
        return
    if read_manifest(folder).complete:
        # A run killed after its manifest, before dropping its receipts, leaves them behind.
        for receipt in folder.glob(".shard-*.receipt.json"):
            receipt.unlink(missing_ok=True)
        raise OutputExistsError(
            f"{folder}: already holds a complete soft-label cache; pass --overwrite to replace it"
        )


def _existing_state(folder: Path, manifest: CacheManifest, *, overwrite: bool, resume: bool) -> str:
    """Return "new", "restart" or "resume" for ``folder``; raise when it must not be touched."""
    if not folder.exists():
        return "new"
    if not folder.is_dir():
        raise InputError(f"{folder}: exists and is not a folder; choose another --out")
    if not (folder / MANIFEST_NAME).is_file():
        if any(folder.iterdir()):
            raise InputError(
                f"{folder}: folder is not empty and holds no soft-label cache ({MANIFEST_NAME}); "
                "choose a new or empty --out"
            )
        return "new"
    refuse_complete_cache(folder, overwrite=overwrite)
    old = read_manifest(folder)
    if old.complete:
        return "restart"
    if overwrite or not resume:
        return "restart"
    if old.run_id != manifest.run_id:
        raise CacheError(
            f"{folder}: holds an unfinished cache of a different {_difference(old, manifest)}; "
            "it is never extended: pass --no-resume to start over, or choose another --out"
        )
    return "resume"


def _difference(old: CacheManifest, new: CacheManifest) -> str:
    """Name what differs between two runs' identities, for the refusal message."""
    if old.teacher != new.teacher:
        old_sha, new_sha = old.teacher.get("sha256"), new.teacher.get("sha256")
        return f"teacher (sha256 {old_sha!s:.12} vs {new_sha!s:.12})"
    if old.num_samples != new.num_samples:
        return f"data (N = {old.num_samples} vs {new.num_samples})"
    old_source, new_source = old.data.get("source"), new.data.get("source")
    if old_source != new_source:
        if isinstance(old_source, dict) and isinstance(new_source, dict):
            for key in sorted(set(old_source) | set(new_source)):
                if old_source.get(key) != new_source.get(key):
                    was, now = old_source.get(key), new_source.get(key)
                    return f"data source ({key}: {was!r:.60} vs {now!r:.60})"
        return "data source"
    if old.temperature != new.temperature:
        return f"temperature (T = {old.temperature} vs {new.temperature})"
    if old.layout != new.layout:
        return f"layout ({old.layout.to_json()} vs {new.layout.to_json()})"
    return "format or tool version"


def _prepare(folder: Path, manifest: CacheManifest, *, restart: bool, fresh: bool) -> None:
    if restart:
        _clear(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # A killed writer leaves its temporary files behind (replacing names them .NAME.*.tmp).
    for stale in folder.glob(".*.tmp"):
        if stale.name.startswith((".shard-", "..shard-", f".{MANIFEST_NAME}.", f".{KEYS_NAME}.")):
            stale.unlink(missing_ok=True)
    if fresh:
        _write_manifest(folder, manifest)


def _clear(folder: Path) -> None:
    """Remove a cache's own files, the manifest first so no half-deleted cache looks complete."""
    (folder / MANIFEST_NAME).unlink(missing_ok=True)
    for pattern in ("shard-*.safetensors", ".shard-*.receipt.json", KEYS_NAME):
        for path in folder.glob(pattern):
            path.unlink()
    fsync_dir(folder)


def _write_manifest(folder: Path, manifest: CacheManifest) -> None:
    with replacing(folder / MANIFEST_NAME) as fh:
        fh.write((json.dumps(manifest.to_json(), indent=2) + "\n").encode("utf-8"))
    fsync_dir(folder)


def _finish(folder: Path, manifest: CacheManifest) -> None:
    """Gather the receipts into keys.txt and the complete manifest, then drop them."""
    import hashlib

    shards: list[ShardInfo] = []
    digest = hashlib.sha256()
    with replacing(folder / KEYS_NAME) as fh:
        for shard in range(manifest.num_shards):
            receipt = read_receipt(folder, shard)
            if receipt is None or receipt.get("run_id") != manifest.run_id:
                raise CacheError(
                    f"{folder}: shard {shard} was not written (did a rank fail?); "
                    "rerun the same command to resume"
                )
            keys = receipt.get("keys")
            if not isinstance(keys, list):
                raise CacheError(f"{folder}: receipt of shard {shard} is damaged; pass --no-resume")
            # surrogateescape: keys from undecodable file names keep their original bytes
            text = "".join(f"{k}\n" for k in keys).encode("utf-8", "surrogateescape")
            digest.update(text)
            fh.write(text)
            shards.append(
                ShardInfo(
                    file=shard_name(shard),
                    first_row=int(receipt["first_row"]),  # type: ignore[call-overload]
                    rows=int(receipt["rows"]),  # type: ignore[call-overload]
                    bytes=int(receipt["bytes"]),  # type: ignore[call-overload]
                    sha256=str(receipt["sha256"]),
                )
            )
    final = replace(
        manifest,
        complete=True,
        shards=tuple(shards),
        created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        data={**manifest.data, "order_sha256": digest.hexdigest()},
    )
    _write_manifest(folder, final)
    for shard in range(manifest.num_shards):
        (folder / receipt_name(shard)).unlink(missing_ok=True)
    fsync_dir(folder)
