"""Export a token cache to DistillKit's offline dataset layout (parquet, exact top-k log-probs).

DistillKit (arcee-ai/DistillKit) trains from a dataset of pre-captured teacher outputs. Its
``LogprobCompressor.decompress_to_sparse`` reads three row formats; the uncompressed one is
``token_ids`` + ``top_values`` (checked first, so any ``logprob_compressor`` config works with
it), which ``OfflineSignalSource`` hands to the losses as log-probabilities
(``log_values=True``, ``preapplied_temperature=1.0``). This module writes exactly that, so the
values are the cache's, bit for bit in float32:

==================  ======================  ==============================================
column              arrow type              content, per sequence of L positions
==================  ======================  ==============================================
``input_ids``       list<uint64>            the sequence's first L tokens
``token_ids``       list<list<int64>> [L,k] the teacher's top-k token ids at each position
``top_values``      list<list<float32>>     their calibrated log-probabilities ``v - lse``
``labels``          list<int64>             ``input_ids[t]`` at scored positions, -100 else
``attention_mask``  list<int64>             ones
==================  ======================  ==============================================

Row ``t`` is the teacher's distribution at position ``t`` (predicting token ``t + 1``), as
DistillKit's vLLM capture lays it out; L is the last scored position + 1, which is why
``input_ids`` is cut to L (DistillKit's own packing cuts ``input_ids`` to the logits' length for
the same reason: the final token has no next-token distribution). Positions before L that were
not scored (a prompt, with ``--completion-only``) get a placeholder row (ids ``0 … k - 1``,
uniform log-probabilities ``-log k``) and ``labels = -100``: DistillKit's distillation mask is
``labels >= 0``, so they never count. Files are ``data_00000.parquet``, … (as DistillKit's
sampler names them), written into a temporary folder renamed into place at the end. A dense
cache (V <= 1000) is exported with k = V, sorted by value. See ``docs/cache-format.md`` for the
DistillKit configuration to train from it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from calibrate_teacher.errors import CacheError, InvalidValueError, MissingDependencyError
from calibrate_teacher.soft_labels.token_reader import TokenSoftLabelCache

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

__all__ = ["DistillKitExport", "export_distillkit"]

IGNORE_LABEL = -100
FILE_PATTERN = "data_{:05d}.parquet"
#: The DistillKit teacher block written beside the data (``distillkit-teacher.json``).
SIDECAR = "distillkit-teacher.json"


@dataclass(frozen=True)
class DistillKitExport:
    """What :func:`export_distillkit` wrote.

    Attributes:
        path: The output folder.
        files: The parquet files, in order.
        sequences: Rows written (one per sequence with scored tokens).
        tokens: Scored positions written.
        k: Log-probabilities per position.
        teacher_config: The ``teacher:`` block of a DistillKit config for this data.
        notes: What was defaulted or skipped.
    """

    path: Path
    files: tuple[str, ...]
    sequences: int
    tokens: int
    k: int
    teacher_config: dict[str, object]
    notes: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, object]:
        """Return the export as a JSON-ready dict."""
        return {
            "path": str(self.path), "files": list(self.files), "sequences": self.sequences,
            "tokens": self.tokens, "k": self.k, "teacher_config": self.teacher_config, "notes": list(self.notes),
        }


def export_distillkit(
    cache: TokenSoftLabelCache | str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    rows_per_file: int = 256,
    overwrite: bool = False,
    verify: bool = True,
) -> DistillKitExport:
    """Write a causal-LM token cache as a DistillKit offline dataset folder (parquet).

    Args:
        cache: A :class:`TokenSoftLabelCache` or its folder.
        out: The folder to create.
        rows_per_file: Sequences per parquet file.
        overwrite: Replace an existing ``out``.
        verify: When ``cache`` is a path, check each shard's SHA-256 as it is read.

    Returns:
        A :class:`DistillKitExport`.

    Raises:
        MissingDependencyError: pyarrow is not installed.
        CacheError: the cache is not a token cache of a causal LM.
        InvalidValueError: ``rows_per_file < 1``.
        OutputExistsError: ``out`` exists and ``overwrite`` is false.
        OutputError: ``out`` cannot be written.
    """
    from calibrate_teacher._io import atomic_output

    try:
        import pyarrow as pa
    except ImportError as exc:  # pragma: no cover - pyarrow is a core dependency
        raise MissingDependencyError("the DistillKit export needs pyarrow: pip install pyarrow") from exc
    if rows_per_file < 1:
        raise InvalidValueError(f"rows_per_file {rows_per_file}: must be at least 1")
    source = cache if isinstance(cache, TokenSoftLabelCache) else TokenSoftLabelCache(cache, verify=verify)
    task = source.manifest.teacher.get("task")
    if task not in (None, "causal-lm"):
        raise CacheError(
            f"{source.path}: holds a {task} teacher's soft labels; DistillKit distils causal LMs (next-token rows)"
        )
    k = source.manifest.layout.width
    schema = pa.schema([
        pa.field("input_ids", pa.list_(pa.uint64())),
        pa.field("token_ids", pa.list_(pa.list_(pa.int64()))),
        pa.field("top_values", pa.list_(pa.list_(pa.float32()))),
        pa.field("labels", pa.list_(pa.int64())),
        pa.field("attention_mask", pa.list_(pa.int64())),
    ])
    notes: list[str] = []
    files: list[str] = []
    written = tokens = skipped = placeholders = 0
    with atomic_output(out, overwrite=overwrite, directory=True) as tmp:
        rows: list[dict[str, np.ndarray]] = []
        for number in range(len(source)):
            row, scored, filled = _row(source, number, k)
            if row is None:
                skipped += 1
                continue
            rows.append(row)
            written += 1
            tokens += scored
            placeholders += filled
            if len(rows) == rows_per_file:
                files.append(_write(schema, tmp, len(files), rows))
                rows = []
        if rows or not files:
            files.append(_write(schema, tmp, len(files), rows))
        teacher_config = _teacher_config(source.vocab_size, k)
        (tmp / SIDECAR).write_text(json.dumps(teacher_config, indent=2) + "\n", encoding="utf-8")
    if skipped:
        notes.append(f"{skipped} sequence(s) without scored tokens were left out")
    if placeholders:
        notes.append(
            f"{placeholders} unscored position(s) before a sequence's last scored one hold a placeholder "
            "row (uniform over ids 0..k-1) with labels -100, which DistillKit's mask (labels >= 0) ignores"
        )
    notes.append(
        f"values are log-probabilities at the calibrated T = {source.temperature:g} (DistillKit's "
        "preapplied_temperature 1.0); a DistillKit loss temperature tau puts the teacher at tau·T"
    )
    return DistillKitExport(
        path=Path(out), files=tuple(files), sequences=written, tokens=tokens, k=k,
        teacher_config=teacher_config, notes=tuple(notes),
    )


def _row(source: TokenSoftLabelCache, number: int, k: int) -> tuple[dict[str, np.ndarray] | None, int, int]:
    import numpy as np

    raw = source.rows(number)
    positions = raw["position"].astype(np.int64)
    if positions.size == 0:
        return None, 0, 0
    length = int(positions[-1]) + 1
    ids = source.input_ids(number).numpy()[:length]
    log_probs = raw["values"].astype(np.float32) - raw["lse"].astype(np.float32)[:, None]
    index = raw["index"]
    if source.manifest.layout.kind == "dense":  # DistillKit expects the top values first
        order = np.argsort(-log_probs, axis=1, kind="stable")
        log_probs = np.take_along_axis(log_probs, order, axis=1)
        index = np.take_along_axis(np.asarray(index), order, axis=1)
    token_ids = np.tile(np.arange(k, dtype=np.int64), (length, 1))
    values = np.full((length, k), -math.log(k), dtype=np.float32)
    token_ids[positions] = index
    values[positions] = log_probs
    labels = np.full(length, IGNORE_LABEL, dtype=np.int64)
    labels[positions] = ids[positions]
    row: dict[str, np.ndarray] = {
        "input_ids": ids.astype(np.uint64), "token_ids": token_ids, "top_values": values, "labels": labels
    }
    return row, int(positions.size), length - int(positions.size)


def _write(schema: pa.Schema, folder: Path, number: int, rows: list[dict[str, np.ndarray]]) -> str:
    """Write one parquet file, building the nested arrow columns straight from numpy (no Python lists)."""
    import numpy as np
    import pyarrow
    import pyarrow.parquet as pq

    arrow: Any = pyarrow
    lengths = np.array([r["labels"].shape[0] for r in rows], dtype=np.int64)
    outer = arrow.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32), type=arrow.int32())

    def flat(name: str, dtype: type) -> np.ndarray:
        parts = [r[name] for r in rows]
        return np.concatenate(parts).astype(dtype, copy=False) if parts else np.empty(0, dtype)

    def nested(name: str, dtype: type, inner_type: pa.DataType) -> pa.Array:
        parts = [r[name].reshape(-1) for r in rows]
        values: np.ndarray = np.concatenate(parts).astype(dtype) if parts else np.empty(0, dtype)
        width = rows[0][name].shape[1] if rows else 0
        inner_offsets = arrow.array((np.arange(int(lengths.sum()) + 1) * width).astype(np.int32), type=arrow.int32())
        inner = arrow.ListArray.from_arrays(inner_offsets, arrow.array(values, type=inner_type))
        return arrow.ListArray.from_arrays(outer, inner)

    columns = [
        arrow.ListArray.from_arrays(outer, arrow.array(flat("input_ids", np.uint64), type=arrow.uint64())),
        nested("token_ids", np.int64, arrow.int64()),
        nested("top_values", np.float32, arrow.float32()),
        arrow.ListArray.from_arrays(outer, arrow.array(flat("labels", np.int64), type=arrow.int64())),
        arrow.ListArray.from_arrays(outer, arrow.array(np.ones(int(lengths.sum()), np.int64), type=arrow.int64())),
    ]
    table = arrow.Table.from_arrays(columns, schema=schema)
    name = FILE_PATTERN.format(number)
    pq.write_table(table, folder / name)
    return name


def _teacher_config(vocab_size: int, k: int) -> dict[str, object]:
    """DistillKit's ``teacher:`` block. ``LogprobCompressor`` needs a config even for raw top-k rows."""
    return {
        "kind": "dataset",
        "logprob_compressor": {
            "d": vocab_size, "k": k, "exact_k": k, "exact_dtype": "float32",
            "polynomial_terms": None, "residual_bins": [], "delta_encoding": False,
        },
    }
