"""Rows of named fields from a file: ``.jsonl``, ``.csv``, ``.parquet`` or a ``save_to_disk`` folder.

:func:`open_records` returns a :class:`RecordFile`, which reads the fields asked for in two ways:

- :meth:`RecordFile.scan` streams chunks of rows in file order (memory: one chunk);
- :meth:`RecordFile.take` reads the rows at some positions, in the order given.

Random access by position needs to know where rows start. ``.jsonl`` and ``.csv`` files are
indexed once when opened (:mod:`calibrate_teacher.data._lines`: the byte offset of every 64th
row, 16 bytes per 64 rows), so reading row ``i`` seeks to the nearest kept offset and skips at
most 63 rows. ``.parquet`` files are read by row group (the row groups' sizes come
from the footer); :meth:`take` keeps the last row group's requested columns, so its memory is one
row group of those columns (write the file with ``row_group_size`` of a few thousand rows for flat
memory), while :meth:`scan` streams record batches. A ``save_to_disk`` folder is memory-mapped by
``datasets.load_from_disk`` (never downloads); a folder whose ``state.json`` names data files
outside the folder is refused.

A value a row lacks is :data:`MISSING` (a JSON object without the key); a null is ``None``.
:meth:`RecordFile.where` names a row for messages ("line 17" for text files, "row 16" otherwise).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from calibrate_teacher.data._lines import MISSING, LineFile
from calibrate_teacher.errors import InputError, MissingDependencyError

__all__ = ["MISSING", "RECORD_SUFFIXES", "RecordFile", "RecordFormat", "is_record_data", "open_records"]

RecordFormat = Literal["jsonl", "csv", "parquet", "arrow"]

#: The file suffixes read as rows (a ``save_to_disk`` folder is recognised by its files).
RECORD_SUFFIXES = (".jsonl", ".csv", ".parquet")

Columns = dict[str, list[Any]]


def is_record_data(path: str | os.PathLike[str]) -> bool:
    """True for a ``.jsonl`` / ``.csv`` / ``.parquet`` file or a ``save_to_disk`` folder."""
    p = Path(path)
    if p.is_dir():
        return (p / "state.json").is_file() or (p / "dataset_dict.json").is_file()
    return p.suffix.lower() in RECORD_SUFFIXES


def open_records(path: str | os.PathLike[str]) -> RecordFile:
    """Open a file (or ``save_to_disk`` folder) of rows.

    Raises:
        InputError: the path is missing, of another type, empty, or unreadable; a dataset
            folder that points outside itself or holds several splits.
        MissingDependencyError: pyarrow (parquet) or datasets (a dataset folder) is missing.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    if p.is_dir():
        if (p / "dataset_dict.json").is_file():
            splits = sorted(c.name for c in p.iterdir() if (c / "state.json").is_file())
            raise InputError(
                f"{p}: a DatasetDict with splits {', '.join(splits) or 'none'}; "
                f"pass one split's folder, e.g. {p / (splits[0] if splits else 'validation')}"
            )
        if not (p / "state.json").is_file():
            raise InputError(f"{p}: not a datasets save_to_disk folder (no state.json)")
        return RecordFile(p, "arrow")
    kind = p.suffix.lower()
    if kind not in RECORD_SUFFIXES:
        raise InputError(f"{p}: unknown row file type {kind or '(none)'}; expected {', '.join(RECORD_SUFFIXES)}")
    return RecordFile(p, kind[1:])  # type: ignore[arg-type]  # the suffix is one of the formats


class RecordFile:
    """Rows of one file, read by chunks in file order or by position.

    Attributes:
        path: The file or folder.
        format: ``"jsonl"``, ``"csv"``, ``"parquet"`` or ``"arrow"`` (a ``save_to_disk`` folder).
        fields: The field names the file declares (csv header, parquet/arrow schema); for
            jsonl, the keys of its first row.
        num_rows: The number of rows (blank jsonl lines are not rows).
    """

    def __init__(self, path: Path, fmt: RecordFormat) -> None:
        self.path = path
        self.format: RecordFormat = fmt
        self._handle: Any = None
        self._cache: tuple[int, tuple[str, ...], Columns] | None = None
        self._lines: LineFile | None = None
        if fmt == "jsonl" or fmt == "csv":
            self._lines = LineFile(path, fmt)
            self.fields, self.num_rows = self._lines.fields, self._lines.num_rows
        elif fmt == "parquet":
            pf = self._parquet()
            self.fields = tuple(pf.schema_arrow.names)
            self.num_rows = int(pf.metadata.num_rows)
            starts = [0]
            for g in range(pf.metadata.num_row_groups):
                starts.append(starts[-1] + pf.metadata.row_group(g).num_rows)
            self._group_starts = starts
        else:
            ds = self._dataset()
            self.fields = tuple(ds.column_names)
            self.num_rows = len(ds)
        if self.num_rows == 0:
            raise InputError(f"{path}: holds no rows")

    def __getstate__(self) -> dict[str, object]:
        # Open handles stay in their process; a worker reopens the file.
        state = dict(self.__dict__)
        state["_handle"] = None
        state["_cache"] = None
        return state

    def __len__(self) -> int:
        """Return the number of rows."""
        return self.num_rows

    # -- parquet and datasets -----------------------------------------------------------------

    def _parquet(self) -> Any:
        if self._handle is None:
            try:
                import pyarrow.parquet as pq
            except ImportError as exc:
                raise MissingDependencyError(
                    f"{self.path}: reading parquet needs pyarrow: pip install 'calibrate-teacher[hf]'"
                ) from exc
            try:
                self._handle = pq.ParquetFile(self.path)
            except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for a foreign file
                raise InputError(f"{self.path}: cannot be read as parquet ({type(exc).__name__}: {exc})") from exc
        return self._handle

    def _dataset(self) -> Any:
        if self._handle is None:
            _check_dataset_files(self.path)
            try:
                import datasets
            except ImportError as exc:
                raise MissingDependencyError(
                    f"{self.path}: reading a save_to_disk folder needs datasets: "
                    "pip install 'calibrate-teacher[datasets]'"
                ) from exc
            try:
                ds = datasets.load_from_disk(str(self.path), keep_in_memory=False)
            except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
                raise InputError(f"{self.path}: cannot be read as a saved dataset ({exc})") from exc
            if not isinstance(ds, datasets.Dataset):
                raise InputError(f"{self.path}: holds several splits; pass one split's folder")
            self._handle = ds.with_format(None)
        return self._handle

    def _group_columns(self, group: int, columns: tuple[str, ...]) -> Columns:
        if self._cache is not None and self._cache[0] == group and self._cache[1] == columns:
            return self._cache[2]
        table = self._parquet().read_row_group(group, columns=[c for c in columns if c in self.fields])
        n = table.num_rows
        out: Columns = {c: table.column(c).to_pylist() if c in self.fields else [MISSING] * n for c in columns}
        self._cache = (group, columns, out)
        return out

    # -- the two ways to read -----------------------------------------------------------------

    def _range(self, start: int, stop: int, columns: tuple[str, ...]) -> Columns:
        if self._lines is not None:
            return self._lines.columns(start, stop - start, columns)
        if self.format == "arrow":
            ds = self._dataset()
            present = [c for c in columns if c in self.fields]
            part = ds.select_columns(present)[start:stop] if present else {}
            return {c: list(part[c]) if c in part else [MISSING] * (stop - start) for c in columns}
        out: Columns = {c: [] for c in columns}
        starts = self._group_starts
        group = next(g for g in range(len(starts) - 1) if starts[g] <= start < starts[g + 1])
        pos = start
        while pos < stop:
            cols = self._group_columns(group, columns)
            a, b = pos - starts[group], min(stop, starts[group + 1]) - starts[group]
            for c in columns:
                out[c].extend(cols[c][a:b])
            pos = starts[group + 1]
            group += 1
        return out

    def take(self, indices: Sequence[int], columns: Sequence[str]) -> Columns:
        """Read ``columns`` of the rows at ``indices`` (in that order).

        Consecutive ascending positions are read as one stretch. A field a row lacks is
        :data:`MISSING`.

        Raises:
            InputError: a row cannot be parsed (the message names the file and line).
        """
        cols = tuple(columns)
        out: Columns = {c: [] for c in cols}
        runs: list[tuple[int, int]] = []
        for i in indices:
            if runs and runs[-1][1] == i:
                runs[-1] = (runs[-1][0], i + 1)
            else:
                runs.append((i, i + 1))
        with self._opened_lines():
            for a, b in runs:
                part = self._range(a, b, cols)
                for c in cols:
                    out[c].extend(part[c])
        return out

    def scan(self, columns: Sequence[str], *, chunk_rows: int = 1024) -> Iterator[tuple[int, Columns]]:
        """Stream ``columns`` of all rows in file order as ``(first row position, columns)``.

        Memory holds one chunk (of at most ``chunk_rows`` rows; parquet: one record batch).

        Raises:
            InputError: a row cannot be parsed (the message names the file and line).
        """
        cols = tuple(columns)
        if self.format == "parquet":
            # Record batches may stop short at row-group ends: regroup into chunks of exactly
            # chunk_rows (the last one aside), so batching does not depend on the file's layout.
            present = [c for c in cols if c in self.fields]
            pos, have = 0, 0
            held: Columns = {c: [] for c in cols}
            for rb in self._parquet().iter_batches(batch_size=chunk_rows, columns=present):
                n = rb.num_rows
                for c in cols:
                    held[c].extend(rb.column(c).to_pylist() if c in present else [MISSING] * n)
                have += n
                while have >= chunk_rows:
                    yield pos, {c: v[:chunk_rows] for c, v in held.items()}
                    held = {c: v[chunk_rows:] for c, v in held.items()}
                    pos, have = pos + chunk_rows, have - chunk_rows
            if have:
                yield pos, held
            return
        with self._opened_lines():
            for start in range(0, self.num_rows, chunk_rows):
                yield start, self._range(start, min(self.num_rows, start + chunk_rows), cols)

    def where(self, index: int) -> str:
        """Name row ``index`` for a message: ``"line L"`` (jsonl, csv) or ``"row i"`` (0-based)."""
        if self._lines is None or not 0 <= index < self.num_rows:
            return f"row {index}"
        return f"line {self._lines.line_of(index)}"

    def fields_of(self, index: int) -> tuple[str, ...]:
        """The fields row ``index`` has (jsonl: its keys; otherwise the file's fields)."""
        return self._lines.fields_of(index) if self._lines is not None else self.fields

    def _opened_lines(self) -> contextlib.AbstractContextManager[None]:
        return self._lines.opened() if self._lines is not None else contextlib.nullcontext()


def _check_dataset_files(folder: Path) -> None:
    # state.json lists the arrow files; each must lie inside the folder (no absolute paths, no ..).
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{folder / 'state.json'}: cannot be read ({exc})") from exc
    files = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(files, list) or not files:
        raise InputError(f"{folder / 'state.json'}: lists no data files (_data_files)")
    root = folder.resolve()
    for entry in files:
        name = entry.get("filename") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name:
            raise InputError(f"{folder / 'state.json'}: a data file entry without a filename")
        target = (folder / name).resolve()
        if Path(name).is_absolute() or not target.is_relative_to(root):
            raise InputError(
                f"{folder / 'state.json'}: data file {name!r} lies outside {folder}; "
                "a dataset folder may only read its own files"
            )
        if not target.is_file():
            raise InputError(f"{folder}: data file {name} is missing")
