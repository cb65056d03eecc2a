"""Writing a token soft-label cache: one row per scored token of every sequence (format version 2).

A token cache is a soft-label cache (``_format.py``: manifest, shards, ``keys.txt``, receipts,
resume, lock, atomic files: the same machinery, ``writer.write_claimed``) whose *samples* are
sequences: ``shard_rows`` sequences per shard, one key per sequence. Inside a shard each scored
token is one row (top-k of ``z / T`` + the full-row log-sum-exp), and ``seq_offsets`` gives each
sequence's row range; ``input_ids`` keeps every sequence's tokens for the reader's alignment
check. The tensors of a shard, in file order::

    sample_index  int64 [n]       the sequence numbers first_row ... first_row + n - 1
    seq_offsets   int64 [n + 1]   rows of sequence i: seq_offsets[i] ... seq_offsets[i + 1] - 1
    ids_offsets   int64 [n + 1]   input_ids of sequence i: ids_offsets[i] ... ids_offsets[i + 1] - 1
    position      int64 [r]       the position in its sequence whose logits the row holds
    label         int64 [r]       the row's target (a causal LM: the next token), -1 unknown
    input_ids     int32 [m]       every sequence's token ids, concatenated
    lse           float32 [r]     log-sum-exp of the full row of z / T
    topk_index    int32 [r, k]    (V > 32767) the kept token ids, largest value first
    topk_logits / logits float16 [r, k] / [r, V]   z / T
    topk_index    int16 [r, k]    (V <= 32767)

Memory is one shard of sequences (``shard_rows`` × tokens × k values) plus the chunk in flight;
the producer hands logits over chunk by chunk (``[m, V]``), so ``[tokens, V]`` is never held.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Protocol

from calibrate_teacher._distributed import DistributedContext
from calibrate_teacher.errors import CacheError, InvalidValueError
from calibrate_teacher.soft_labels._calibration import Calibration
from calibrate_teacher.soft_labels._format import FP16_MAX, CacheManifest
from calibrate_teacher.soft_labels._output import claim_output
from calibrate_teacher.soft_labels._shards import shard_rows_of
from calibrate_teacher.soft_labels.writer import plan_manifest, write_claimed

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = [
    "DEFAULT_TOKEN_SHARD_ROWS",
    "TokenProducer",
    "TokenSequence",
    "compute_token_shard",
    "plan_token_manifest",
    "write_token_soft_labels",
]

#: Sequences per shard by default (a shard of 256 sequences × 2048 tokens × k = 64 is ~100 MB).
DEFAULT_TOKEN_SHARD_ROWS = 256
_INT32_MAX = 2**31 - 1


class TokenSequence(Protocol):
    """One sequence as the teacher scored it: what the token cache writer needs.

    ``logits()`` yields the raw teacher logits (not yet divided by T) of the scored positions, in
    the order of ``positions``, in chunks ``[m, V]`` (float; any device) whose rows add up to
    ``len(positions)``: recompute them from hidden states chunk by chunk, never ``[S, V]`` at once
    when V is large.
    """

    @property
    def key(self) -> str:
        """A stable key for the sequence (one line of ``keys.txt``)."""
        ...

    @property
    def input_ids(self) -> torch.Tensor:
        """The sequence's token ids ``[S]`` (integers in [0, 2**31))."""
        ...

    @property
    def positions(self) -> torch.Tensor:
        """The scored positions ``[n]``, strictly increasing, in [0, S)."""
        ...

    @property
    def labels(self) -> torch.Tensor:
        """The target of each scored position ``[n]`` (a causal LM: ``input_ids[t + 1]``); -1 unknown."""
        ...

    def logits(self) -> Iterable[torch.Tensor]:
        """The scored positions' raw logits, in chunks ``[m, V]``."""
        ...


#: Given sequence numbers, yield those sequences in that order.
TokenProducer = Callable[[Sequence[int]], Iterable[TokenSequence]]


def plan_token_manifest(
    *,
    num_sequences: int,
    vocab_size: int,
    temperature: float | Calibration,
    teacher: Mapping[str, object] | None,
    data: Mapping[str, object] | None,
    top_k: int | None,
    shard_rows: int,
) -> CacheManifest:
    """Return the unfinished manifest of a token cache request (nothing is written).

    Raises:
        InvalidValueError: bad T, top_k, shard_rows, number of sequences, or V >= 2**31.
    """
    if vocab_size > _INT32_MAX:
        raise InvalidValueError(f"vocab_size {vocab_size}: token ids must fit int32")
    return plan_manifest(
        num_samples=num_sequences, num_classes=vocab_size, temperature=temperature, teacher=teacher,
        data=data, top_k=top_k, shard_rows=shard_rows, unit="token",
    )


def write_token_soft_labels(
    produce: TokenProducer,
    out: str | os.PathLike[str],
    *,
    num_sequences: int,
    vocab_size: int,
    temperature: float | Calibration,
    teacher: Mapping[str, object] | None = None,
    data: Mapping[str, object] | None = None,
    top_k: int | None = None,
    shard_rows: int = DEFAULT_TOKEN_SHARD_ROWS,
    overwrite: bool = False,
    resume: bool = True,
    context: DistributedContext | None = None,
    progress: Callable[[int, int], None] | None = None,
    notify: Callable[[str], None] | None = None,
) -> CacheManifest:
    """Write the calibrated soft labels ``z / T`` of every scored token of ``num_sequences`` sequences.

    Behaves as :func:`~calibrate_teacher.soft_labels.write_soft_labels` does (atomic shards,
    resumable, locked, refuses to overwrite, torchrun-aware), with sequences as its samples.

    Args:
        produce: Yields the sequences with the given numbers, in that order (see
            :class:`TokenSequence`).
        out: The cache folder.
        num_sequences: How many sequences the data holds.
        vocab_size: V, the width of each logit row.
        temperature: T, or a :class:`Calibration`.
        teacher: What the manifest records about the teacher (file, sha256, format, task...).
        data: The data source's description.
        top_k: None: dense when V <= 1000, else the top 64; 0: dense; K: the top K.
        shard_rows: Sequences per shard.
        overwrite: Replace a complete cache at ``out``.
        resume: Continue an unfinished cache of the same request (False: start over).
        context: This process's rank and world size (default: one process).
        progress: Called with (sequences just written, sequences to do).
        notify: Called with one line for the user.

    Returns:
        The complete manifest (``data.num_tokens``: the scored tokens; each shard's ``tokens``).

    Raises:
        OutputExistsError: a complete cache of another request is at ``out`` (no ``overwrite``).
        CacheError: an unfinished cache of another request is at ``out``, or the producer
            returned other sequences, positions or logits than declared.
        InputError: ``out`` is a file or a non-empty folder that is not a cache.
        OutputError: ``out`` cannot be written.
        InvalidValueError: bad options, non-finite or fp16-overflowing logits / T, bad token ids.
    """
    ctx = context or DistributedContext()
    manifest = plan_token_manifest(
        num_sequences=num_sequences, vocab_size=vocab_size, temperature=temperature, teacher=teacher,
        data=data, top_k=top_k, shard_rows=shard_rows,
    )
    with claim_output(out, context=ctx) as claim:
        return write_claimed(
            produce, claim, manifest, overwrite=overwrite, resume=resume, progress=progress,
            notify=notify, shard_computer=compute_token_shard,
        )


def compute_token_shard(
    produce: TokenProducer,
    manifest: CacheManifest,
    shard: int,
    progress: Callable[[int], None] | None,
    pool: Executor,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Run the producer over one shard's sequences; return the shard's arrays (file order) and keys."""
    import numpy as np

    del pool  # the teacher's chunks are reduced as they arrive: nothing to overlap at this size
    layout = manifest.layout
    first = shard * layout.shard_rows
    rows = shard_rows_of(manifest, shard)
    names = ("position", "label", "input_ids", "lse", "values", "index")
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    seq_offsets, ids_offsets = [0], [0]
    keys: list[str] = []
    for n, sequence in enumerate(produce(range(first, first + rows))):
        if n >= rows:
            raise CacheError(f"shard {shard}: the data yielded more than its {rows} sequences")
        row = first + n
        key = _check_key(sequence.key, row)
        ids, positions, labels = _check_sequence(sequence, row)
        count = _store_sequence(sequence, manifest, positions.shape[0], parts, key=key, row=row)
        keys.append(key)
        parts["position"].append(positions)
        parts["label"].append(labels)
        parts["input_ids"].append(ids)
        seq_offsets.append(seq_offsets[-1] + count)
        ids_offsets.append(ids_offsets[-1] + ids.shape[0])
        if progress is not None:
            progress(1)
    if len(keys) != rows:
        raise CacheError(
            f"shard {shard}: the data yielded {len(keys)} of sequences {first}..{first + rows - 1}; "
            "was the data changed during the export?"
        )
    width = layout.width
    value_dtype = np.float16
    index_dtype = np.int32 if layout.index_dtype == "int32" else np.int16

    def joined(name: str, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
        return np.concatenate(parts[name]).astype(dtype, copy=False) if parts[name] else np.empty(shape, dtype)

    arrays: dict[str, np.ndarray] = {
        "sample_index": np.arange(first, first + rows, dtype=np.int64),
        "seq_offsets": np.asarray(seq_offsets, dtype=np.int64),
        "ids_offsets": np.asarray(ids_offsets, dtype=np.int64),
        "position": joined("position", np.int64, (0,)),
        "label": joined("label", np.int64, (0,)),
        "input_ids": joined("input_ids", np.int32, (0,)),
        "lse": joined("lse", np.float32, (0,)),
    }
    if layout.kind == "topk" and layout.index_dtype == "int32":
        arrays["topk_index"] = joined("index", index_dtype, (0, width))
    arrays["logits" if layout.kind == "dense" else "topk_logits"] = joined("values", value_dtype, (0, width))
    if layout.kind == "topk" and layout.index_dtype == "int16":
        arrays["topk_index"] = joined("index", index_dtype, (0, width))
    return arrays, keys


def _check_key(key: str, row: int) -> str:
    if not isinstance(key, str) or "\n" in key or "\r" in key:
        raise InvalidValueError(f"sequence key {key!r} (sequence {row}): keys are one line of text each")
    try:
        key.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise InvalidValueError(f"sequence key {key!r} (sequence {row}): holds a lone surrogate") from None
    return key


def _check_sequence(sequence: TokenSequence, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import numpy as np
    import torch

    ids = sequence.input_ids.detach().cpu()
    positions = sequence.positions.detach().cpu()
    labels = sequence.labels.detach().cpu()
    where = f"sequence {sequence.key!r} (sequence {row})"
    if ids.ndim != 1 or positions.ndim != 1 or labels.shape != positions.shape:
        raise CacheError(
            f"{where}: input_ids {tuple(ids.shape)}, positions {tuple(positions.shape)} and labels "
            f"{tuple(labels.shape)} must be [S], [n], [n]"
        )
    if ids.is_floating_point() or positions.is_floating_point() or labels.is_floating_point():
        raise CacheError(f"{where}: input_ids, positions and labels must be integer tensors")
    ids64, pos64 = ids.to(torch.int64), positions.to(torch.int64)
    if ids64.numel() and (int(ids64.min()) < 0 or int(ids64.max()) > _INT32_MAX):
        raise InvalidValueError(f"{where}: token ids must lie in [0, 2**31)")
    if pos64.numel() and (
        int(pos64.min()) < 0 or int(pos64.max()) >= ids64.numel() or bool((pos64[1:] <= pos64[:-1]).any())
    ):
        raise CacheError(f"{where}: scored positions must be strictly increasing and lie in [0, {ids64.numel()})")
    return ids64.numpy().astype(np.int32), pos64.numpy(), labels.to(torch.int64).numpy()


def _store_sequence(
    sequence: TokenSequence,
    manifest: CacheManifest,
    expected: int,
    parts: dict[str, list[np.ndarray]],
    *,
    key: str,
    row: int,
) -> int:
    """Divide each logits chunk by T, reduce it to lse + top-k (or dense fp16), append; return rows."""
    import torch

    layout = manifest.layout
    t = manifest.temperature
    count = 0
    for chunk in sequence.logits():
        logits = chunk.detach().to(torch.float32)
        if logits.ndim != 2 or logits.shape[1] != layout.num_classes:
            raise CacheError(
                f"sequence {key!r} (sequence {row}): a logits chunk of shape {tuple(logits.shape)}, "
                f"expected [m, {layout.num_classes}]"
            )
        m = int(logits.shape[0])
        if m == 0:
            continue
        scaled = logits / t
        low, high = (float(v) for v in torch.aminmax(scaled))
        if not (math.isfinite(low) and math.isfinite(high)):
            raise InvalidValueError(
                f"sequence {key!r} (sequence {row}): the teacher returned NaN or Inf logits; check the teacher"
            )
        if max(-low, high) > FP16_MAX:
            raise InvalidValueError(
                f"sequence {key!r} (sequence {row}): logits / T reach {max(-low, high):.4g}, beyond "
                f"float16's range ({FP16_MAX:g}); use a larger temperature or check the teacher"
            )
        parts["lse"].append(torch.logsumexp(scaled, dim=1).cpu().numpy())
        if layout.kind == "dense":
            parts["values"].append(scaled.to(torch.float16).cpu().numpy())
        else:
            values, index = torch.topk(scaled, int(layout.width), dim=1)
            parts["values"].append(values.to(torch.float16).cpu().numpy())
            parts["index"].append(index.cpu().numpy())
        count += m
    if count != expected:
        raise CacheError(
            f"sequence {key!r} (sequence {row}): the teacher gave logits for {count} positions, "
            f"but {expected} are scored"
        )
    return count
