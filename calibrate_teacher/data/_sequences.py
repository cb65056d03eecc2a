"""What the text sources share: windows of rows, dynamic padding, keys, labels by name.

A source reads its rows in *windows* (8 batches; 64 when sorting by length), tokenises each
window in one fast-tokenizer call, optionally sorts the window's rows by token count (longest
first) and cuts it into batches padded to their own longest row. Sorting within windows keeps
memory flat in N while most of the padding goes; every batch still carries each row's original
position (``Batch.indices``) and key. With ``workers > 0`` whole windows are read and tokenised
in DataLoader worker processes and arrive in order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from calibrate_teacher.data._records import MISSING, Columns, RecordFile
from calibrate_teacher.errors import InputError, InvalidValueError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from calibrate_teacher.data.base import Batch

#: Label value of an unscored position in a sequence (PyTorch's cross-entropy ignore index).
IGNORE_INDEX = -100


@dataclass
class Encoded:
    """A tokenised window: per-row feature lists (unpadded), labels, original positions, keys."""

    features: dict[str, list[list[int]]]
    positions: list[int]
    keys: list[str]
    labels: list[int] | None = None  # one class per row; None for sequence labels in features


def pad_values(tokenizer: PreTrainedTokenizerBase) -> tuple[dict[str, int], str, str | None]:
    """Pad value per feature name, the pad side, and a note when eos stands in for a missing pad.

    Raises:
        InputError: the tokenizer has neither a pad nor an eos token.
    """
    pad_id = tokenizer.pad_token_id
    note = None
    if pad_id is None:
        if tokenizer.eos_token_id is None:
            raise InputError(
                f"{getattr(tokenizer, 'name_or_path', 'the tokenizer')}: has no pad token (and no eos token) "
                "to pad batches with; set pad_token in its tokenizer_config.json"
            )
        pad_id = int(tokenizer.eos_token_id)
        note = (
            f"the tokenizer has no pad token: batches are padded with eos (id {pad_id}), masked out by attention_mask"
        )
    values = {
        "input_ids": int(pad_id),
        "attention_mask": 0,
        "token_type_ids": int(getattr(tokenizer, "pad_token_type_id", 0) or 0),
        "labels": IGNORE_INDEX,
    }
    return values, str(getattr(tokenizer, "padding_side", "right") or "right"), note


def collate(window: Encoded, rows: Sequence[int], pads: Mapping[str, int], side: str) -> dict[str, Any]:
    """Pad rows ``rows`` of a window to their longest: ``{"inputs", "labels", "indices", "keys"}``."""
    import numpy as np
    import torch

    length = max(len(window.features["input_ids"][r]) for r in rows)
    arrays: dict[str, Any] = {}
    for name, values in window.features.items():
        out = np.full((len(rows), length), pads.get(name, 0), dtype=np.int64)
        for i, r in enumerate(rows):
            seq = values[r]
            if seq:
                if side == "left":
                    out[i, length - len(seq) :] = seq
                else:
                    out[i, : len(seq)] = seq
        arrays[name] = torch.from_numpy(out)
    if window.labels is not None:
        labels = torch.tensor([window.labels[r] for r in rows], dtype=torch.int64)
    else:
        labels = arrays.pop("labels")
    return {
        "inputs": arrays,
        "labels": labels,
        "indices": torch.tensor([window.positions[r] for r in rows], dtype=torch.int64),
        "keys": [window.keys[r] for r in rows],
    }


def split_window(window: Encoded, *, batch_size: int, sort: bool) -> list[list[int]]:
    """Row groups of a window: in order, or longest first (stable) when ``sort``."""
    order = list(range(len(window.positions)))
    if sort:
        ids = window.features["input_ids"]
        order.sort(key=lambda r: -len(ids[r]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _rows(cols: Columns) -> int:
    return len(next(iter(cols.values())))


class _WindowDataset:
    # Map-style: item = a list of positions; returns that window's padded batches.
    def __init__(self, work: Callable[[list[int]], list[dict[str, Any]]], length: int) -> None:
        self.work = work
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, positions: list[int]) -> list[dict[str, Any]]:
        return self.work(positions)


def _keep(item: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return item


class WindowedBatches:
    """Turns a :class:`RecordFile` and an encoder into :class:`Batch` objects (picklable).

    ``encode(columns, positions)`` tokenises one window's rows.
    """

    def __init__(
        self,
        records: RecordFile,
        columns: Sequence[str],
        encode: Callable[[Columns, list[int]], Encoded],
        tokenizer: PreTrainedTokenizerBase,
        *,
        sort: bool,
    ) -> None:
        self.records = records
        self.columns = tuple(columns)
        self.encode = encode
        self.sort = sort
        self.pads, self.side, self.pad_note = pad_values(tokenizer)

    def _padded(self, window: Encoded, batch_size: int) -> Iterator[dict[str, Any]]:
        for group in split_window(window, batch_size=batch_size, sort=self.sort):
            yield collate(window, group, self.pads, self.side)

    def _work(self, positions: list[int], batch_size: int) -> list[dict[str, Any]]:
        return list(self._padded(self.encode(self.records.take(positions, self.columns), positions), batch_size))

    def batches(
        self, *, batch_size: int, workers: int, pin_memory: bool, indices: Sequence[int] | None
    ) -> Iterator[Batch]:
        """Yield padded batches (see the module docstring for order and windows)."""
        import functools

        from calibrate_teacher.data.base import Batch

        if batch_size < 1:
            raise InvalidValueError(f"batch_size: expected a positive integer, got {batch_size}")
        if workers < 0:
            raise InvalidValueError(f"workers: expected 0 or more, got {workers}")
        n = len(self.records)
        window_rows = batch_size * (64 if self.sort else 8)
        produced: Iterator[Iterable[dict[str, Any]]]
        if indices is None and workers == 0:
            # Streaming in file order: memory is one window.
            produced = (
                self._padded(self.encode(cols, list(range(start, start + _rows(cols)))), batch_size)
                for start, cols in self.records.scan(self.columns, chunk_rows=window_rows)
            )
        else:
            order = list(range(n)) if indices is None else [int(i) for i in indices]
            bad = next((i for i in order if not 0 <= i < n), None)
            if bad is not None:
                raise InvalidValueError(f"indices: {bad} is out of range for {n} samples")
            plan = [order[i : i + window_rows] for i in range(0, len(order), window_rows)]
            if workers == 0:
                produced = (self._work(w, batch_size) for w in plan)
            else:
                from torch.utils.data import DataLoader

                loader: DataLoader[list[dict[str, Any]]] = DataLoader(
                    _WindowDataset(functools.partial(self._work, batch_size=batch_size), n),  # type: ignore[arg-type]
                    batch_size=None,
                    sampler=plan,  # a list of index lists is a valid sampler when batch_size=None
                    num_workers=workers,
                    collate_fn=_keep,  # with batch_size=None it gets one item
                    pin_memory=pin_memory,
                )
                produced = iter(loader)
        for window in produced:
            for item in window:
                inputs = item["inputs"]
                if pin_memory and workers == 0:
                    inputs = {k: v.pin_memory() for k, v in inputs.items()}
                yield Batch(inputs=inputs, labels=item["labels"], indices=item["indices"], keys=tuple(item["keys"]))


def check_fields(records: RecordFile, needed: Sequence[str], *, what: str) -> None:
    """A field the file's schema lacks is an error listing the fields it has (csv, parquet, arrow).

    Raises:
        InputError: a needed field is not in the schema.
    """
    if records.format == "jsonl":
        return  # per row: see missing_field
    for name in needed:
        if name not in records.fields:
            raise InputError(
                f"{records.path}: no field {name!r} ({what}); the file has: {', '.join(records.fields) or 'none'}"
            )


def missing_field(records: RecordFile, index: int, name: str, *, what: str) -> InputError:
    """The error for row ``index`` lacking ``name``: names the file, line/row, and the fields present."""
    present = records.fields_of(index)
    return InputError(
        f"{records.path}: {records.where(index)}: no value for field {name!r} ({what}); "
        f"the row has: {', '.join(present) or 'nothing'}"
    )


def label_id(
    value: object,
    *,
    names: Mapping[str, int] | None,
    num_classes: int | None,
    where: Callable[[], str],
    field_name: str,
    allow_missing: bool,
    missing_ok_value: int = -1,
) -> int:
    """One label as a class index: an integer id, or a name looked up in the class list.

    Raises:
        InputError: a missing label (unless allowed), an unknown name, a name with no class
            list, an id out of range, or a value of another type.
    """
    if value is MISSING or value is None or (isinstance(value, str) and not value.strip()):
        if allow_missing:
            return missing_ok_value
        raise InputError(
            f"{where()}: no {field_name} value; every row needs one (name the field with --label-field; "
            "exporting soft labels allows rows without one)"
        )
    if isinstance(value, str):
        if names is not None and value in names:
            return names[value]
        text = value.strip()
        if text.lstrip("-").isdigit():
            value = int(text)
        elif names is not None:
            known = ", ".join(names)
            raise InputError(f"{where()}: unknown {field_name} {value!r}; the known names are: {known}")
        else:
            raise InputError(
                f"{where()}: {field_name} {value!r} is a name but no class list is known; "
                "give the class names in label order (--classes FILE, or a teacher with id2label)"
            )
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{where()}: {field_name} {value!r} is not a class id or name")
    if value < -1 or (num_classes is not None and value >= num_classes):
        limit = f"0..{num_classes - 1}" if num_classes is not None else "0 or more"
        raise InputError(f"{where()}: {field_name} {value} is out of range ({limit}, or -1 for none)")
    return value


class KeyCheck:
    """Checks that every row's id is present and unique, fed chunk by chunk during a scan.

    Memory: one 8-byte hash per row; only when two hashes agree is the file read again to name
    the first repeated id (in file order).
    """

    def __init__(self, records: RecordFile, id_field: str) -> None:
        import numpy as np

        self.records = records
        self.id_field = id_field
        self.hashes = np.zeros(len(records), dtype=np.int64)

    def add(self, start: int, values: Sequence[object]) -> None:
        """Record the ids of rows ``start ..``.

        Raises:
            InputError: a row has no id.
        """
        for i, v in enumerate(values):
            if v is MISSING or v is None:
                raise missing_field(self.records, start + i, self.id_field, what="the id field")
            self.hashes[start + i] = hash(str(v))

    def finish(self) -> None:
        """Raise if two rows share an id.

        Raises:
            InputError: names the first row whose id repeats an earlier one, and that row.
        """
        import numpy as np

        sorted_h = np.sort(self.hashes)
        dup = sorted_h[1:] == sorted_h[:-1]
        if not dup.any():
            return
        suspects = set(sorted_h[1:][dup].tolist())
        seen: dict[str, int] = {}
        records, name = self.records, self.id_field
        for start, cols in records.scan([name]):
            for i, v in enumerate(cols[name]):
                key = str(v)
                if hash(key) not in suspects:
                    continue
                if key in seen:
                    raise InputError(
                        f"{records.path}: {records.where(start + i)}: id {key!r} ({name}) repeats "
                        f"{records.where(seen[key])}; keys must be unique"
                    )
                seen[key] = start + i


def check_unique_keys(records: RecordFile, id_field: str) -> None:
    """Every row's id must be present and unique (see :class:`KeyCheck`).

    Raises:
        InputError: a row lacks the id, or two rows share one.
    """
    check = KeyCheck(records, id_field)
    for start, cols in records.scan([id_field]):
        check.add(start, cols[id_field])
    check.finish()
