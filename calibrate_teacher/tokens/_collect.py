"""The one inference pass over token data: scored tokens into a store, metrics on the way.

Per batch: find the scored positions (``_positions``), take the final hidden states (a causal LM
with a head) or the logits (anything else) at those positions only, feed their logits to a
metrics accumulator, and append what later passes need to a :class:`~calibrate_teacher.tokens._store.TokenStore`.
On the first batch a head's recomputed logits are checked against ``model(**batch).logits``
(relative 1e-4); when they differ the run falls back to the model's logits, with a note.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from calibrate_teacher.errors import InputError, InvalidValueError
from calibrate_teacher.tokens._positions import scored_positions
from calibrate_teacher.tokens._store import SMALL_VOCAB, RerunLogits, ScoredLogits, TokenStore, chunk_rows

if TYPE_CHECKING:
    import torch

    from calibrate_teacher.tokens.metrics import TokenMetricsAccumulator
    from calibrate_teacher.tokens.teacher import TokenInputs, TokenTeacher

Progress = Callable[[int, int | None], None]
#: Relative tolerance of the head check: recomputed logits vs the model's own.
HEAD_RTOL = 1e-4


def batch_parts(batch: object) -> tuple[TokenInputs, torch.Tensor]:
    """``(inputs, labels)`` of a :class:`~calibrate_teacher.data.base.Batch` or an ``(inputs, labels)`` pair.

    Raises:
        InputError: anything else, or inputs without ``input_ids``.
    """
    import torch

    if hasattr(batch, "inputs") and hasattr(batch, "labels"):
        inputs, labels = batch.inputs, batch.labels
    elif isinstance(batch, tuple | list) and len(batch) == 2:
        inputs, labels = batch
    elif isinstance(batch, Mapping) and "labels" in batch:
        inputs, labels = {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
    else:
        raise InputError(
            f"token data: a batch is {type(batch).__name__}; yield Batch objects, (inputs, labels) pairs or "
            "dicts with input_ids, attention_mask and labels"
        )
    if not isinstance(inputs, Mapping) or "input_ids" not in inputs or not isinstance(labels, torch.Tensor):
        raise InputError("token data: inputs must be a mapping with input_ids (and attention_mask) and labels a tensor")
    return inputs, labels


def replayable(data: object, *, batch_size: int) -> Callable[[], Iterable[object]]:
    """A function giving a fresh iterable of batches on each call (a DataSource, a list, a DataLoader).

    Raises:
        InvalidValueError: ``data`` is a one-shot iterator (it cannot be replayed).
    """
    batches = getattr(data, "batches", None)
    if callable(batches):
        return lambda: batches(batch_size=batch_size)
    if not isinstance(data, Iterable):
        raise InvalidValueError(f"data: {type(data).__name__} is not iterable; pass a DataSource or a list of batches")
    if iter(data) is data:
        return _once(data)
    return lambda: data


def _once(data: Iterable[object]) -> Callable[[], Iterable[object]]:
    used = False

    def again() -> Iterable[object]:
        nonlocal used
        if used:
            raise InvalidValueError(
                "data: a one-shot iterator cannot be read twice; pass a list of batches, a DataLoader or a "
                "DataSource so that the teacher can be re-run on each pass"
            )
        used = True
        return data

    return again


@dataclass
class Collected:
    """What the inference pass gave.

    Attributes:
        scored: The replayable scored logits (None when nothing was kept).
        num_tokens: Scored tokens.
        num_sequences: Sequences (rows) seen, scored or not.
        vocab_size: ``V``.
        seconds: Wall time of the pass.
        notes: Remarks (the head check, the store chosen...).
    """

    scored: ScoredLogits | None
    num_tokens: int
    num_sequences: int
    vocab_size: int
    seconds: float
    notes: list[str] = field(default_factory=list)


def _head_matches(teacher: TokenTeacher, inputs: TokenInputs, hidden: torch.Tensor) -> tuple[bool, float]:
    """Whether ``head(hidden)`` equals the model's own logits on the attended positions; also the error.

    Only the batch's first sequence is checked (run alone, so the check costs ``[1, S, V]``, not
    ``[B, S, V]`` four times over); ``hidden`` is the whole batch's and is not used.
    """
    assert teacher.head is not None
    inputs = {k: v[:1] for k, v in inputs.items()}
    hidden = teacher.final_hidden(inputs)
    ref = teacher.logits(inputs)
    mask = inputs.get("attention_mask")
    keep = mask.to(ref.device) != 0 if mask is not None else None
    ref_rows = ref[keep] if keep is not None else ref.reshape(-1, ref.shape[-1])
    h = hidden[keep.to(hidden.device)] if keep is not None else hidden.reshape(-1, hidden.shape[-1])
    mine = teacher.head.logits(h).to(ref_rows.device)
    scale = max(1.0, float(ref_rows.abs().max())) if ref_rows.numel() else 1.0
    err = float((mine - ref_rows).abs().max()) / scale if ref_rows.numel() else 0.0
    return mine.shape == ref_rows.shape and err <= HEAD_RTOL, err


def collect_tokens(
    teacher: TokenTeacher,
    data: object,
    *,
    batch_size: int,
    keep: bool,
    accumulator: Callable[[int], TokenMetricsAccumulator] | None,
    progress: Progress | None = None,
    store_dir: str | None = None,
) -> tuple[Collected, TokenMetricsAccumulator | None]:
    """Run ``teacher`` once over ``data``; keep replayable scored logits when ``keep``.

    Args:
        teacher: The sequence teacher.
        data: Batches (see :func:`batch_parts`), or a DataSource.
        batch_size: Batch size for a DataSource (an iterable keeps its own batching).
        keep: Build a store for later passes (a fit). Small-``V`` logits are stored even when
            not, for their classwise metrics.
        accumulator: Builds the metrics accumulator at T = 1 given ``V`` (None: no metrics).
        progress: Called after each batch with (tokens so far, None).
        store_dir: Where the temporary store goes (default: the system's temp folder).

    Returns:
        ``(collected, accumulator)``.
    """
    import torch

    from calibrate_teacher.tokens._malloc import fix_mmap_threshold

    fix_mmap_threshold()  # else freed chunks stay resident (see _malloc)
    start = time.perf_counter()
    source = replayable(data, batch_size=batch_size)
    use_head = teacher.head is not None
    notes: list[str] = []
    store: TokenStore | None = None
    acc: TokenMetricsAccumulator | None = None
    targets_all: list[torch.Tensor] = []
    sequences_all: list[torch.Tensor] = []
    tokens = sequences = 0
    vocab = 0
    for batch in source():
        inputs, labels = batch_parts(batch)
        pos = scored_positions(inputs.get("attention_mask"), labels, task=teacher.task)
        seq_ids = pos.rows + sequences
        sequences += int(labels.shape[0])
        hidden = None
        if use_head and tokens == 0 and store is None:
            hidden = teacher.final_hidden(inputs)
            ok, err = _head_matches(teacher, inputs, hidden)
            if ok:
                notes.append(f"logits recomputed from final hidden states and the LM head (checked: max relative "
                             f"error {err:.1e} on the first batch)")
            else:
                use_head = False
                notes.append(f"the LM head did not reproduce the model's logits on the first batch (relative error "
                             f"{err:.1e} > {HEAD_RTOL:g}); used the model's own logits")
        if pos.count == 0:
            continue
        if use_head:
            hidden = teacher.final_hidden(inputs) if hidden is None else hidden
            feats = hidden[pos.mask.to(hidden.device)]
            assert teacher.head is not None
            vocab = teacher.head.vocab_size
            rows = chunk_rows(vocab, teacher.device)
            head = teacher.head
            z_chunks: Iterator[torch.Tensor] = (head.logits(feats[i : i + rows]) for i in range(0, len(feats), rows))
        else:
            full = teacher.logits(inputs)
            vocab = int(full.shape[-1])
            feats = full[pos.mask.to(full.device)]
            z_chunks = iter([feats])
        y = pos.scored_targets()
        if int(y.max()) >= vocab:
            raise InputError(f"token labels: target {int(y.max())} is outside the teacher's vocabulary [0, {vocab})")
        if acc is None and accumulator is not None:
            acc = accumulator(vocab)
        if store is None and ((use_head and keep) or (not use_head and vocab <= SMALL_VOCAB)):
            device = teacher.device if teacher.device.startswith("cuda") else "cpu"
            store = TokenStore(kind="hidden" if use_head else "logits", head=teacher.head if use_head else None,
                               device=device, directory=store_dir)
        if store is not None:
            store.append(feats, y, seq_ids)
        else:
            targets_all.append(y.cpu())
            sequences_all.append(seq_ids.cpu())
        if acc is not None:
            done = 0
            for z in z_chunks:
                acc.add(z, y[done : done + z.shape[0]].to(z.device), seq_ids[done : done + z.shape[0]])
                done += z.shape[0]
        tokens += pos.count
        if progress is not None:
            progress(tokens, None)
    if tokens == 0:
        if store is not None:
            store.close()
        raise InputError("token data: no position was scored (attention_mask = 1 and label != -100); check the labels")
    scored: ScoredLogits | None = None
    if store is not None:
        store.finish()
        scored = store
        what = "final hidden states" if store.kind == "hidden" else "scored logits"
        notes.append(f"stored {tokens:,} tokens' {what} in a temporary folder ({store.disk_bytes / 2**20:.1f} MiB)")
    elif keep:
        scored = RerunLogits(teacher, source, targets=torch.cat(targets_all), sequences=torch.cat(sequences_all),
                             vocab_size=vocab)
        notes.append(
            f"V = {vocab:,} > {SMALL_VOCAB} and no LM head: every pass of the fit re-runs the teacher over the data"
        )
    collected = Collected(scored, tokens, sequences, vocab, time.perf_counter() - start, notes)
    return collected, acc
