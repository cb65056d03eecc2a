"""Rows of a ``.jsonl`` or ``.csv`` file, indexed once so any row can be read by position.

Opening reads the bytes once and keeps the byte offset (and line number) of every 64th row
(:data:`STRIDE`): 16 bytes per 64 rows. Reading row ``i`` seeks to the nearest kept offset and
skips at most 63 rows. A CSV record may span lines (a quoted newline): records are found by
``csv.reader`` itself, which pulls one line at a time, so the byte count consumed after each
record is where the next one starts. Blank jsonl lines are not rows; line numbers in messages
are the file's own (1-based).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from calibrate_teacher.errors import InputError

__all__ = ["MISSING", "STRIDE", "LineFile"]

STRIDE = 64  # keep the byte offset of every 64th row


class _Missing:
    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        # One instance, also after unpickling in a worker process.
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "MISSING"

    def __reduce__(self) -> str:
        return "MISSING"


#: Stands for a field a row does not have.
MISSING: Any = _Missing()


class LineFile:
    """A ``.jsonl`` or ``.csv`` file read by row position (picklable; the handle is per process).

    Attributes:
        path: The file.
        format: ``"jsonl"`` or ``"csv"``.
        fields: The CSV header, or the keys of the first jsonl row.
        num_rows: The number of rows.
    """

    def __init__(self, path: Path, fmt: Literal["jsonl", "csv"]) -> None:
        self.path = path
        self.format = fmt
        self._handle: io.BufferedReader | None = None
        self._offsets = array("q")
        self._line_of_mark = array("q")
        self.fields, self.num_rows = self._index()

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        state["_handle"] = None
        return state

    def _lines(self, fh: io.BufferedReader, start_line: int) -> Iterator[tuple[int, int, bytes]]:
        # (line number, byte offset, raw line) from the current position.
        line = start_line
        offset = fh.tell()
        for raw in fh:
            yield line, offset, raw
            line += 1
            offset += len(raw)

    def _index(self) -> tuple[tuple[str, ...], int]:
        rows = 0
        fields: tuple[str, ...] = ()
        with open(self.path, "rb") as fh:
            if self.format == "jsonl":
                for line, offset, raw in self._lines(fh, 1):
                    if not raw.strip():
                        continue
                    if rows % STRIDE == 0:
                        self._offsets.append(offset)
                        self._line_of_mark.append(line)
                    if rows == 0:
                        fields = tuple(self._json_row(raw, line))
                    rows += 1
                return fields, rows
            records = self._csv_records(fh, 1)
            header = next(records, None)
            if header is None:
                raise InputError(f"{self.path}: empty CSV file; the first line must name the fields")
            fields = tuple(header[2])
            for line, offset, _ in records:
                if rows % STRIDE == 0:
                    self._offsets.append(offset)
                    self._line_of_mark.append(line)
                rows += 1
        return fields, rows

    def _csv_records(self, fh: io.BufferedReader, start_line: int) -> Iterator[tuple[int, int, list[str]]]:
        # csv.reader pulls lines only as it needs them, so the byte position after each record
        # is where the next one starts (quoted fields may span lines).
        state = {"line": start_line, "offset": fh.tell()}
        first = fh.tell() == 0

        def text_lines() -> Iterator[str]:
            nonlocal first
            for raw in fh:
                state["line"] += 1
                state["offset"] += len(raw)
                try:
                    text = raw.decode("utf-8-sig" if first else "utf-8")
                except UnicodeDecodeError as exc:
                    raise InputError(f"{self.path}: line {state['line'] - 1}: not UTF-8 ({exc.reason})") from exc
                first = False
                yield text

        line, offset = state["line"], state["offset"]
        try:
            for record in csv.reader(text_lines(), strict=True):
                if record:  # csv.reader gives [] for a blank line
                    yield line, offset, record
                line, offset = state["line"], state["offset"]
        except csv.Error as exc:
            raise InputError(f"{self.path}: line {state['line'] - 1}: bad CSV ({exc})") from exc

    def _json_row(self, raw: bytes, line: int) -> dict[str, Any]:
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InputError(
                f"{self.path}: line {line}: not valid JSON ({exc.msg} at column {exc.colno}); "
                "each line must be one JSON object"
            ) from exc
        except UnicodeDecodeError as exc:
            raise InputError(f"{self.path}: line {line}: not UTF-8 ({exc.reason})") from exc
        if not isinstance(row, dict):
            raise InputError(f"{self.path}: line {line}: a JSON {type(row).__name__}, expected an object of fields")
        return row

    def rows(self, start: int, count: int) -> Iterator[tuple[int, list[Any] | dict[str, Any]]]:
        """Rows ``start .. start + count - 1`` as (line number, dict for jsonl / list for csv)."""
        mark = start // STRIDE
        skip = start - mark * STRIDE
        fh = self._file()
        fh.seek(self._offsets[mark])
        line0 = self._line_of_mark[mark]
        produced = 0
        if self.format == "jsonl":
            for line, _, raw in self._lines(fh, line0):
                if not raw.strip():
                    continue
                if skip:
                    skip -= 1
                    continue
                yield line, self._json_row(raw, line)
                produced += 1
                if produced == count:
                    return
        else:
            for line, _, record in self._csv_records(fh, line0):
                if skip:
                    skip -= 1
                    continue
                yield line, record
                produced += 1
                if produced == count:
                    return

    def _file(self) -> io.BufferedReader:
        if self._handle is None:
            self._handle = open(self.path, "rb")  # noqa: SIM115  # closed by _opened
        handle: io.BufferedReader = self._handle
        return handle

    @contextlib.contextmanager
    def opened(self) -> Iterator[None]:
        """Keep the file open for one take / scan / message (never between calls)."""
        if self._handle is not None:
            yield
            return
        try:
            yield
        finally:
            if self._handle is not None:
                self._handle.close()
                self._handle = None

    def columns(self, start: int, count: int, columns: Sequence[str]) -> dict[str, list[Any]]:
        """The values of ``columns`` for ``count`` rows from ``start`` (:data:`MISSING` where absent).

        Raises:
            InputError: a row cannot be parsed, or a CSV row has the wrong number of values.
        """
        out: dict[str, list[Any]] = {c: [] for c in columns}
        if self.format == "jsonl":
            for _, row in self.rows(start, count):
                assert isinstance(row, dict)
                for c in columns:
                    out[c].append(row.get(c, MISSING))
            return out
        where = {c: self.fields.index(c) for c in columns if c in self.fields}
        for line, record in self.rows(start, count):
            assert isinstance(record, list)
            if len(record) != len(self.fields):
                raise InputError(
                    f"{self.path}: line {line}: {len(record)} values but the header names {len(self.fields)} fields"
                )
            for c in columns:
                out[c].append(record[where[c]] if c in where else MISSING)
        return out

    def line_of(self, index: int) -> int:
        """The line row ``index`` starts on."""
        with self.opened():
            line, _ = next(self.rows(index, 1))
        return line

    def fields_of(self, index: int) -> tuple[str, ...]:
        """The fields of row ``index`` (jsonl: its keys; csv: the header)."""
        if self.format == "csv":
            return self.fields
        with self.opened():
            _, row = next(self.rows(index, 1))
        return tuple(row)
