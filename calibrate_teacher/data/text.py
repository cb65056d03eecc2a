"""Text classification data: rows of text (and label) tokenised for a sequence-classification teacher.

:func:`open_text` reads ``.jsonl``, ``.csv``, ``.parquet`` or a ``datasets`` ``save_to_disk``
folder (see :mod:`calibrate_teacher.data._records` for how each is read in chunks) and yields
batches whose ``inputs`` are ``{"input_ids", "attention_mask"[, "token_type_ids"]}`` (int64, the
names the tokenizer's ``model_input_names`` give), padded to the longest row of each batch on
the tokenizer's pad side with its pad id, truncated at ``max_length``.

Labels are integer ids, or names mapped through ``class_names`` (the teacher's ``id2label``
order). Keys are the ``id_field`` values (unique), or the row position as text. The file is
checked once when opened (every row has a text, a valid label and a unique id), so a bad row
stops the run before the teacher starts.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from calibrate_teacher.data._records import MISSING, Columns, RecordFile, open_records
from calibrate_teacher.data._sequences import (
    Encoded,
    KeyCheck,
    WindowedBatches,
    check_fields,
    label_id,
    missing_field,
)
from calibrate_teacher.data._tokenizer import load_tokenizer, resolve_max_length, tokenizer_name
from calibrate_teacher.errors import InputError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from calibrate_teacher.data.base import Batch

__all__ = ["TextSource", "open_text"]


def open_text(
    path: str | os.PathLike[str],
    *,
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike[str],
    text_field: str = "text",
    text_pair_field: str | None = None,
    label_field: str = "label",
    id_field: str | None = None,
    max_length: int | None = None,
    class_names: Sequence[str] | None = None,
    class_names_origin: str = "the given class list",
    sort_by_length: bool = False,
    allow_missing_labels: bool = False,
    trust_remote_code: bool = False,
) -> TextSource:
    """Open a file of text rows as a classification data source.

    Args:
        path: A ``.jsonl`` / ``.csv`` / ``.parquet`` file or a ``save_to_disk`` folder.
        tokenizer: A loaded tokenizer, or the folder to load it from (``--tokenizer DIR``).
        text_field: The field holding the text.
        text_pair_field: The field holding the second text of a pair, if any.
        label_field: The field holding the label (an integer id or a class name).
        id_field: The field holding a unique key per row; None keys rows by position.
        max_length: Truncate to this many tokens; None takes the tokenizer's
            ``model_max_length`` (or 512 when it has none), recorded in ``notes``.
        class_names: Class names in label order (the teacher's ``id2label``); needed when
            labels are names.
        class_names_origin: Where the class names came from, for the description.
        sort_by_length: Sort rows by token count within windows of 64 batches so batches pad
            less; ``Batch.indices`` and keys still name each row's original position.
        allow_missing_labels: Rows without a label get -1 (exporting soft labels) instead of
            an error.
        trust_remote_code: Passed to :func:`~calibrate_teacher.data._tokenizer.load_tokenizer`.

    Returns:
        The source.

    Raises:
        InputError: the file is unreadable, a field is missing, a label unknown or out of
            range, an id repeats, or the tokenizer cannot be loaded.
        InvalidValueError: ``max_length`` below 1, or a tokenizer needing remote code.
        MissingDependencyError: transformers, pyarrow or datasets is missing.
    """
    if isinstance(tokenizer, str | os.PathLike):
        tokenizer = load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
    return TextSource(
        open_records(path),
        tokenizer,
        text_field=text_field,
        text_pair_field=text_pair_field,
        label_field=label_field,
        id_field=id_field,
        max_length=max_length,
        class_names=class_names,
        class_names_origin=class_names_origin,
        sort_by_length=sort_by_length,
        allow_missing_labels=allow_missing_labels,
    )


class _Encoder:
    # Picklable: tokenises one window of rows (runs in DataLoader workers too).
    def __init__(self, source: TextSource, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        self.records = source.records
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.text_field = source.text_field
        self.pair_field = source.text_pair_field
        self.label_field = source.label_field if source.has_labels else None
        self.id_field = source.id_field
        self.names = source.label_ids
        self.num_classes = source.num_classes
        self.allow_missing = source.allow_missing_labels

    def texts(self, cols: Columns, field: str, positions: Sequence[int]) -> list[str]:
        values = cols[field]
        for i, v in enumerate(values):
            if v is MISSING or v is None:
                raise missing_field(self.records, positions[i], field, what="the text")
            if not isinstance(v, str):
                where = self.records.where(positions[i])
                raise InputError(f"{self.records.path}: {where}: field {field!r} is a {type(v).__name__}, not text")
        return values

    def labels(self, cols: Columns, positions: Sequence[int]) -> list[int]:
        if self.label_field is None:
            return [-1] * len(positions)
        return [
            label_id(
                v,
                names=self.names,
                num_classes=self.num_classes,
                where=functools.partial(self.where, positions[i]),
                field_name=f"label ({self.label_field})",
                allow_missing=self.allow_missing,
            )
            for i, v in enumerate(cols[self.label_field])
        ]

    def where(self, position: int) -> str:
        return f"{self.records.path}: {self.records.where(position)}"

    def keys(self, cols: Columns, positions: Sequence[int]) -> list[str]:
        if self.id_field is None:
            return [str(p) for p in positions]
        return [str(v) for v in cols[self.id_field]]

    def __call__(self, cols: Columns, positions: list[int]) -> Encoded:
        texts = self.texts(cols, self.text_field, positions)
        pairs = self.texts(cols, self.pair_field, positions) if self.pair_field else None
        enc = self.tokenizer(texts, pairs, truncation=True, max_length=self.max_length, padding=False)
        features = {name: list(enc[name]) for name in enc if name != "special_tokens_mask"}
        if "attention_mask" not in features:  # a tokenizer that does not return one: all real tokens
            features["attention_mask"] = [[1] * len(ids) for ids in features["input_ids"]]
        return Encoded(
            features=features,
            positions=positions,
            keys=self.keys(cols, positions),
            labels=self.labels(cols, positions),
        )


class TextSource:
    """Tokenised text rows with class labels (see :func:`open_text`).

    Attributes:
        path: The file or folder.
        records: The row reader.
        num_classes: The number of classes (the class list's length), or None.
        class_names: Class names in label order, or None.
        description: What the source is, JSON-ready: kind, path, format, fields, tokenizer,
            max_length and where it came from, padding, sorting, classes.
        notes: One-line remarks on defaults that stood in (printed on stderr).
        skipped: Always empty (a bad row is an error).
    """

    def __init__(
        self,
        records: RecordFile,
        tokenizer: PreTrainedTokenizerBase,
        *,
        text_field: str = "text",
        text_pair_field: str | None = None,
        label_field: str = "label",
        id_field: str | None = None,
        max_length: int | None = None,
        class_names: Sequence[str] | None = None,
        class_names_origin: str = "the given class list",
        sort_by_length: bool = False,
        allow_missing_labels: bool = False,
    ) -> None:
        """Check the rows once (fields, labels, ids) and set up batching; see :func:`open_text`."""
        self.records = records
        self.path: Path = records.path
        self.text_field = text_field
        self.text_pair_field = text_pair_field
        self.label_field = label_field
        self.id_field = id_field
        self.allow_missing_labels = allow_missing_labels
        self.class_names: tuple[str, ...] | None = tuple(str(c) for c in class_names) if class_names else None
        self.num_classes: int | None = len(self.class_names) if self.class_names else None
        self.label_ids: dict[str, int] | None = (
            {n: i for i, n in enumerate(self.class_names)} if self.class_names else None
        )
        self.skipped: list[tuple[str, str]] = []
        notes: list[str] = []
        length, length_from, length_note = resolve_max_length(tokenizer, max_length)
        if length_note:
            notes.append(length_note)
        fields = [text_field, *([text_pair_field] if text_pair_field else []), *([id_field] if id_field else [])]
        check_fields(records, fields, what="the text or id field")
        self.has_labels = records.format == "jsonl" or label_field in records.fields
        if not self.has_labels:
            if not allow_missing_labels:
                raise InputError(
                    f"{records.path}: no label field {label_field!r}; the file has: "
                    f"{', '.join(records.fields)}; pass --label-field NAME"
                )
            notes.append(f"no label field {label_field!r}: every label is -1")
        elif allow_missing_labels and records.format == "jsonl" and label_field not in records.fields:
            notes.append(f"the first row has no label field {label_field!r}: rows without one get label -1")
        self._encoder = _Encoder(self, tokenizer, length)
        columns = [*fields, *([label_field] if self.has_labels else [])]
        self._check_rows(columns)
        self._batches = WindowedBatches(records, columns, self._encoder, tokenizer, sort=sort_by_length)
        if self._batches.pad_note:
            notes.append(self._batches.pad_note)
        self.notes: tuple[str, ...] = tuple(notes)
        self.description: dict[str, object] = {
            "kind": "text",
            "path": str(records.path),
            "format": records.format,
            "num_samples": len(records),
            "fields": {"text": text_field, "text_pair": text_pair_field, "label": label_field, "id": id_field},
            "keys_from": f"field {id_field!r}" if id_field else "row position",
            "labels_from": f"field {label_field!r}" if self.has_labels else "none: -1",
            "tokenizer": tokenizer_name(tokenizer),
            "max_length": length,
            "max_length_from": length_from,
            "padding": f"longest in each batch, {self._batches.side} side, pad id {self._batches.pads['input_ids']}",
            "sort_by_length": "within windows of 64 batches, longest first" if sort_by_length else False,
            "num_classes": self.num_classes,
            "classes": list(self.class_names) if self.class_names else None,
            "classes_from": class_names_origin if self.class_names else None,
            "preprocess": None,
            "preprocess_from": "tokenizer",
            "notes": list(notes),
        }

    def _check_rows(self, columns: Sequence[str]) -> None:
        # One streaming pass: text present and a string, label valid, ids unique; only id hashes kept.
        enc = self._encoder
        keys = KeyCheck(self.records, self.id_field) if self.id_field else None
        for start, cols in self.records.scan(columns):
            positions = range(start, start + len(cols[columns[0]]))
            enc.texts(cols, self.text_field, positions)
            if self.text_pair_field:
                enc.texts(cols, self.text_pair_field, positions)
            enc.labels(cols, positions)
            if keys is not None:
                keys.add(start, cols[keys.id_field])
        if keys is not None:
            keys.finish()

    def __len__(self) -> int:
        """Return the number of rows."""
        return len(self.records)

    def batches(
        self,
        *,
        batch_size: int,
        workers: int = 0,
        pin_memory: bool = False,
        indices: Sequence[int] | None = None,
    ) -> Iterator[Batch]:
        """Yield padded batches in file order (or ``indices`` order; sorted within windows if asked).

        Args:
            batch_size: Rows per batch.
            workers: DataLoader worker processes reading and tokenising windows (0: here).
            pin_memory: Put the inputs in page-locked memory (for a CUDA teacher).
            indices: A subset of row positions, in the order wanted.
        """
        return self._batches.batches(batch_size=batch_size, workers=workers, pin_memory=pin_memory, indices=indices)
