"""Writing a soft-label cache: shard by shard, resumable, and shared between torchrun ranks.

Rows are cut into shards of ``shard_rows`` fixed by position (shard ``s`` holds rows
``[s * shard_rows, (s + 1) * shard_rows)``), and shard ``s`` is written by rank ``s % world_size``.
Each shard asks the producer for exactly its rows, so its bytes do not depend on how many
processes ran or where an earlier run was interrupted.

A shard is finished once its hidden receipt (checksum + keys) exists; the shard file itself is
renamed into place first. A rerun skips finished shards. Once every shard is finished, rank 0
writes ``keys.txt`` and the complete ``manifest.json``, then removes the receipts.

The folder is claimed first (``_output.py``: checked, created, locked), so a second export into
it fails at once. Rerunning a finished request is a no-op that returns the manifest (a retry
loop succeeds); a different request over a complete cache is refused unless ``overwrite``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from calibrate_teacher._distributed import DistributedContext
from calibrate_teacher.errors import CacheError, InvalidValueError
from calibrate_teacher.soft_labels._calibration import Calibration
from calibrate_teacher.soft_labels._format import (
    KEYS_NAME,
    MANIFEST_NAME,
    CacheLayout,
    CacheManifest,
    RowUnit,
    ShardInfo,
    read_manifest,
    receipt_name,
    run_id,
    shard_name,
)
from calibrate_teacher.soft_labels._output import DONE, FAILED, GO, OutputClaim, claim_output, on_main_rank
from calibrate_teacher.soft_labels._shards import (
    BatchProducer,
    RowBatch,
    ShardComputer,
    compute_shard,
    fsync_dir,
    persist_shard,
    read_receipt,
    replacing,
    shard_done,
    shard_rows_of,
    writing,
)
from calibrate_teacher.soft_labels._state import existing_state, is_ours, tidy
from calibrate_teacher.soft_labels._validate import MAX_SHARDS

__all__ = [
    "DEFAULT_SHARD_ROWS",
    "BatchProducer",
    "RowBatch",
    "choose_layout",
    "plan_manifest",
    "write_claimed",
    "write_soft_labels",
]

DEFAULT_SHARD_ROWS = 16384
#: Above this many classes the default layout keeps only the top 10 of each row.
DENSE_MAX_CLASSES = 1000
DEFAULT_TOP_K = 10
#: A token cache's default k when V > 1000 (LM vocabularies: the tail mass is kept in ``lse``).
DEFAULT_TOKEN_TOP_K = 64


def choose_layout(
    num_classes: int, top_k: int | None, shard_rows: int, *, unit: RowUnit = "sample"
) -> CacheLayout:
    """Pick dense or top-k storage.

    Args:
        num_classes: C.
        top_k: None: dense when C <= 1000, else the top 10 (the top 64 for a token cache);
            0: dense; 1 <= K < C: the top K.
        shard_rows: Rows (samples; sequences for a token cache) per shard.
        unit: ``"sample"`` (classification rows) or ``"token"`` (one row per scored token).

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
        wide = DEFAULT_TOKEN_TOP_K if unit == "token" else DEFAULT_TOP_K
        top_k = 0 if num_classes <= DENSE_MAX_CLASSES else wide
    if top_k < 0 or top_k >= num_classes:
        raise InvalidValueError(
            f"--top-k {top_k}: must lie in [1, {num_classes - 1}] for {num_classes} classes; "
            "use --top-k 0 for dense rows"
        )
    if top_k == 0:
        return CacheLayout(kind="dense", k=None, num_classes=num_classes, shard_rows=shard_rows, unit=unit)
    return CacheLayout(kind="topk", k=top_k, num_classes=num_classes, shard_rows=shard_rows, unit=unit)


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
    notify: Callable[[str], None] | None = None,
) -> CacheManifest:
    """Write the calibrated soft labels ``logits / T`` of ``num_samples`` rows as a cache folder.

    Memory is two shards' worth (one computed, one being written), whatever ``num_samples``
    is. Run once per rank under torchrun (pass ``context``): each rank writes its shards and
    rank 0 writes the manifest at the end. ``out`` is locked for the export (a second export
    into it fails at once); the same request over a complete cache returns its manifest and
    writes nothing. An export that fails before finishing a shard leaves ``out`` as it was.

    Args:
        produce: Yields the batches for the given row positions, in that order.
        out: The cache folder (created; an unfinished cache there is resumed).
        num_samples: N, the number of rows.
        num_classes: C, the width of each logit row.
        temperature: T, or a :class:`Calibration` that also says how T was chosen.
        teacher: What the manifest records about the teacher (file, sha256, format...).
        data: The data source's description (recorded, and compared when resuming; its
            ``path`` and ``classes_from`` are compared resolved).
        top_k: Storage layout, see :func:`choose_layout`.
        shard_rows: Rows per shard.
        overwrite: Replace a complete cache at ``out``.
        resume: Continue an unfinished cache of the same teacher, data, T and layout (False:
            start over).
        context: This process's rank and world size (default: one process).
        progress: Called with (rows just computed, rows this rank has to do) after each batch,
            and once with (0, rows to do) before the first.
        notify: Called with one line for the user, e.g. that the cache was already complete.

    Returns:
        The complete manifest (on every rank).

    Raises:
        OutputExistsError: ``out`` holds a complete cache of another request and ``overwrite``
            is false.
        CacheError: ``out`` holds an unfinished cache of another teacher/data/T/layout or a
            damaged manifest, is being written by another export, or the producer returned
            rows other than those asked for.
        InputError: ``out`` is a file, or a non-empty folder that is not a cache.
        OutputError: ``out`` cannot be created or written, or a write failed (no space left,
            read-only, permission denied); finished shards are kept for a rerun.
        InvalidValueError: bad T, top_k, shard_rows, N, or non-finite / fp16-overflowing logits.
    """
    ctx = context or DistributedContext()
    manifest = plan_manifest(
        num_samples=num_samples, num_classes=num_classes, temperature=temperature,
        teacher=teacher, data=data, top_k=top_k, shard_rows=shard_rows,
    )
    with claim_output(out, context=ctx) as claim:
        return write_claimed(
            produce, claim, manifest, overwrite=overwrite, resume=resume, progress=progress, notify=notify
        )


def plan_manifest(
    *,
    num_samples: int,
    num_classes: int,
    temperature: float | Calibration,
    teacher: Mapping[str, object] | None,
    data: Mapping[str, object] | None,
    top_k: int | None,
    shard_rows: int,
    unit: RowUnit = "sample",
) -> CacheManifest:
    """Return the unfinished manifest of a request, checking its options (nothing is written).

    Raises:
        InvalidValueError: bad T, top_k, shard_rows or N, or descriptions that are not JSON.
    """
    calibration = temperature if isinstance(temperature, Calibration) else Calibration(temperature)
    layout = choose_layout(num_classes, top_k, shard_rows, unit=unit)
    if num_samples < 1:
        raise InvalidValueError(f"num_samples {num_samples}: the data holds no samples to export")
    shards = -(-num_samples // shard_rows)
    if shards > MAX_SHARDS:
        raise InvalidValueError(
            f"--shard-rows {shard_rows}: {num_samples:,} rows would make {shards:,} shards, more than "
            f"{MAX_SHARDS:,}; use --shard-rows {-(-num_samples // MAX_SHARDS)} or more"
        )
    # JSON-normalised now (tuples -> lists...), so they compare equal to what a rerun reads back
    teacher_block = _as_json({**dict(teacher or {}), "num_classes": num_classes})
    data_block = _as_json(
        {
            "source": dict(data) if data is not None else None,
            "num_samples": num_samples,
            "order_sha256": None,
        }
    )
    return CacheManifest(
        teacher=teacher_block,
        data=data_block,
        calibration=calibration,
        layout=layout,
        run_id=run_id(teacher_block, data_block, calibration.temperature, layout),
        format_version=layout.format_version,
    )


def write_claimed(
    produce: Any,
    claim: OutputClaim,
    manifest: CacheManifest,
    *,
    overwrite: bool,
    resume: bool,
    progress: Callable[[int, int], None] | None,
    notify: Callable[[str], None] | None,
    shard_computer: ShardComputer | None = None,
) -> CacheManifest:
    """:func:`write_soft_labels` into a folder this run has claimed (see ``_output.py``).

    ``shard_computer`` turns the producer's output for one shard into its arrays and keys (default:
    classification rows, :func:`~calibrate_teacher.soft_labels._shards.compute_shard`; the token
    cache passes its own).
    """
    compute_one = shard_computer or compute_shard
    ctx, folder = claim.context, claim.folder
    if ctx.is_main:
        try:
            state, manifest = existing_state(folder, manifest, overwrite=overwrite, resume=resume)
            if state == "done":
                tidy(folder)
                if notify is not None:
                    notify(f"{folder}: already complete; nothing to do")
            else:
                _prepare(folder, manifest, restart=state == "restart", fresh=state != "resume")
                claim.wrote_manifest = state != "resume"
        except BaseException:
            ctx.share(FAILED)
            raise
        decision = ctx.share(DONE if state == "done" else GO)
    else:
        decision = ctx.share(0)
        if decision == FAILED:
            raise CacheError(f"{folder}: rank 0 could not start the export; see its error")
        if (folder / MANIFEST_NAME).is_file():  # rank 0 may have adopted the unfinished run's identity
            on_disk = read_manifest(folder)
            manifest = replace(manifest, teacher=on_disk.teacher, data=on_disk.data, run_id=on_disk.run_id)
    if decision == DONE:
        return read_manifest(folder)

    mine = range(ctx.rank, manifest.num_shards, ctx.world_size)
    todo = [s for s in mine if not shard_done(folder, s, manifest)]
    total = sum(shard_rows_of(manifest, s) for s in todo)
    if progress is not None:
        progress(0, total)
    step = (lambda n: progress(n, total)) if progress is not None else None
    # Three threads overlap: this one runs the teacher, `compute` divides by T and stores each
    # batch, `disk` hashes, writes and fsyncs the previous shard (torch and I/O release the
    # GIL). At most two shards are in memory. Leaving the block, even on an error or Ctrl-C
    # (which always lands in this thread), waits only for the shard being written, so that
    # it is finished with its receipt; the shard being computed is dropped.
    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="soft-labels-compute") as compute,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="soft-labels-disk") as disk,
    ):
        pending: Future[None] | None = None
        for shard in todo:
            arrays, keys = compute_one(produce, manifest, shard, step, compute)
            if pending is not None:
                pending.result()
            pending = disk.submit(persist_shard, folder, manifest, shard, arrays, keys)
            del arrays, keys  # the disk thread holds the only reference: memory stays two shards
        if pending is not None:
            pending.result()

    ctx.barrier()
    on_main_rank(ctx, lambda: _finish(folder, manifest), failed=f"{folder}: rank 0 could not finish the manifest")
    return read_manifest(folder)


def _token_count(manifest: CacheManifest, shards: list[ShardInfo]) -> dict[str, object]:
    if manifest.layout.unit != "token":
        return {}
    return {"num_tokens": sum(s.tokens or 0 for s in shards)}


def _as_json(block: Mapping[str, object]) -> dict[str, object]:
    try:
        value: dict[str, object] = json.loads(json.dumps(block, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidValueError(f"teacher/data description is not JSON-serialisable ({exc})") from exc
    return value


def _prepare(folder: Path, manifest: CacheManifest, *, restart: bool, fresh: bool) -> None:
    with writing(folder / MANIFEST_NAME):
        if restart:
            _clear(folder)
        # A killed writer leaves its temporary files behind (replacing names them .NAME.*.tmp).
        for stale in folder.iterdir():
            if stale.name.endswith(".tmp") and is_ours(stale.name):
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
    with writing(folder / KEYS_NAME), replacing(folder / KEYS_NAME) as fh:
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
                    tokens=int(receipt["tokens"]) if receipt.get("tokens") is not None else None,  # type: ignore[call-overload]
                )
            )
    final = replace(
        manifest,
        complete=True,
        shards=tuple(shards),
        created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        data={**manifest.data, "order_sha256": digest.hexdigest(), **_token_count(manifest, shards)},
    )
    with writing(folder / MANIFEST_NAME):
        _write_manifest(folder, final)
        for shard in range(manifest.num_shards):
            (folder / receipt_name(shard)).unlink(missing_ok=True)
        fsync_dir(folder)
