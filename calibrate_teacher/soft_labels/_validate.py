"""Checking a manifest's JSON before anything is built from it.

A manifest may be hand-edited or damaged. Every field is checked for type and range, and the
shard list against the layout (names, row ranges, sizes, checksums), before a reader or writer
sizes anything by it: a ``num_samples`` of 1e15 or a ``shard_rows`` of 0 is a one-line
:class:`~calibrate_teacher.errors.CacheError` naming the file and the field, never a
``MemoryError`` or a ``ZeroDivisionError``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from calibrate_teacher.errors import CacheError

__all__ = ["MAX_SHARDS", "check_manifest_doc", "is_sha256"]

#: The most shards a cache may have (the writer refuses layouts beyond it, the reader too).
MAX_SHARDS = 1_000_000

_SHA256 = re.compile(r"[0-9a-f]{64}")
_FIX = "the manifest was edited or damaged: re-export the cache (or pass --overwrite)"


def is_sha256(value: object) -> bool:
    """True for a lower-case hex SHA-256 digest (64 characters)."""
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


class _Fields:
    """Typed look-ups into one JSON object that raise naming the manifest and the field."""

    def __init__(self, source: str, doc: Mapping[str, object], prefix: str = "") -> None:
        self.source, self.doc, self.prefix = source, doc, prefix

    def fail(self, name: str, problem: str) -> CacheError:
        return CacheError(f"{self.source}: field {self.prefix}{name} {problem}; {_FIX}")

    def obj(self, name: str, *, optional: bool = False) -> _Fields | None:
        value = self.doc.get(name)
        if value is None and optional:
            return None
        if not isinstance(value, dict):
            raise self.fail(name, f"is {_shown(value)}, expected a JSON object")
        return _Fields(self.source, value, f"{self.prefix}{name}.")

    def integer(self, name: str, *, low: int, high: int | None = None) -> int:
        value = self.doc.get(name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(name, f"is {_shown(value)}, expected an integer")
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise self.fail(name, f"is {value}, expected an integer {bound}")
        return value

    def text(self, name: str, *, optional: bool = False) -> str | None:
        value = self.doc.get(name)
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise self.fail(name, f"is {_shown(value)}, expected a string")
        return value

    def digest(self, name: str, *, optional: bool = False) -> None:
        value = self.doc.get(name)
        if value is None and optional:
            return
        if not is_sha256(value):
            raise self.fail(name, f"is {_shown(value)}, expected a 64-character hex SHA-256")

    def number(self, name: str, *, positive: bool = False) -> float:
        value = self.doc.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise self.fail(name, f"is {_shown(value)}, expected a finite number")
        if positive and value <= 0:
            raise self.fail(name, f"is {value}, expected a number > 0")
        return float(value)


def _shown(value: object) -> str:
    text = "missing" if value is None else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_manifest_doc(
    doc: Mapping[str, object], *, source: str, format_version: int, shard_name: str
) -> None:
    """Check a manifest's JSON: every field's type and range, and the shard list's consistency.

    Args:
        doc: The parsed ``manifest.json``.
        source: The manifest's path, for messages.
        format_version: The newest format version this calibrate-teacher reads.
        shard_name: The shard file name pattern, e.g. ``"shard-{:05d}.safetensors"``.

    Raises:
        CacheError: naming ``source`` and the first bad field.
    """
    top = _Fields(source, doc)
    version = top.integer("format_version", low=1)
    if version > format_version:
        raise CacheError(
            f"{source}: cache format_version {version} is newer than this calibrate-teacher "
            f"reads ({format_version}); upgrade calibrate-teacher"
        )
    if not isinstance(doc.get("complete"), bool):
        raise top.fail("complete", f"is {_shown(doc.get('complete'))}, expected true or false")
    complete = bool(doc["complete"])
    top.digest("run_id")
    top.text("created_at", optional=True)
    top.text("tool_version", optional=True)
    if doc.get("keys", "keys.txt") != "keys.txt":
        raise top.fail("keys", f"is {_shown(doc.get('keys'))}, expected 'keys.txt'")

    layout = top.obj("layout")
    assert layout is not None
    kind = layout.text("kind")
    if kind not in ("dense", "topk"):
        raise layout.fail("kind", f"is {kind!r}, expected 'dense' or 'topk'")
    num_classes = layout.integer("num_classes", low=2)
    shard_rows = layout.integer("shard_rows", low=1)
    unit = layout.doc.get("unit", "sample")
    if unit not in ("sample", "token"):
        raise layout.fail("unit", f"is {_shown(unit)}, expected 'token' (or absent)")
    if unit == "token" and version < 2:
        raise layout.fail("unit", f"is 'token', which needs format_version 2 or later (the file says {version})")
    if kind == "dense":
        if layout.doc.get("k") is not None:
            raise layout.fail("k", f"is {_shown(layout.doc.get('k'))}, expected null for dense rows")
    else:
        layout.integer("k", low=1, high=num_classes - 1)

    teacher = top.obj("teacher")
    assert teacher is not None
    if "num_classes" in teacher.doc and teacher.doc["num_classes"] != num_classes:
        raise teacher.fail(
            "num_classes", f"is {_shown(teacher.doc['num_classes'])}, but layout.num_classes is {num_classes}"
        )

    data = top.obj("data")
    assert data is not None
    num_samples = data.integer("num_samples", low=1)
    data.obj("source", optional=True)
    data.digest("order_sha256", optional=not complete)
    num_shards = -(-num_samples // shard_rows)
    if num_shards > MAX_SHARDS:
        raise data.fail(
            "num_samples",
            f"is {num_samples}: {num_shards} shards of layout.shard_rows {shard_rows} rows, more than "
            f"the {MAX_SHARDS:,} a cache can hold",
        )

    calibration = top.obj("calibration")
    assert calibration is not None
    calibration.number("temperature", positive=True)
    calibration.text("method", optional=True)
    calibration.text("objective", optional=True)
    calibration.text("report", optional=True)
    metrics = calibration.obj("metrics", optional=True)
    if metrics is not None:
        for name in metrics.doc:
            metrics.number(name)

    _check_shards(
        top, complete=complete, num_samples=num_samples, shard_rows=shard_rows, pattern=shard_name,
        tokens=unit == "token",
    )


def _check_shards(
    top: _Fields, *, complete: bool, num_samples: int, shard_rows: int, pattern: str, tokens: bool = False
) -> None:
    shards = top.doc.get("shards", [])
    if not isinstance(shards, list):
        raise top.fail("shards", f"is {_shown(shards)}, expected a list")
    num_shards = -(-num_samples // shard_rows)
    # An unfinished cache lists none (any it lists must still be right); a complete one all.
    if len(shards) != num_shards and (complete or len(shards) > num_shards):
        raise top.fail(
            "shards",
            f"lists {len(shards)} shard(s), but data.num_samples {num_samples} in blocks of "
            f"layout.shard_rows {shard_rows} needs {num_shards}",
        )
    for number, entry in enumerate(shards):
        if not isinstance(entry, dict):
            raise top.fail(f"shards[{number}]", f"is {_shown(entry)}, expected a JSON object")
        shard = _Fields(top.source, entry, f"shards[{number}].")
        expected = pattern.format(number)
        if shard.text("file") != expected:  # also keeps every shard a plain name inside the folder
            raise shard.fail("file", f"is {_shown(entry.get('file'))}, expected {expected!r}")
        first = number * shard_rows
        rows = min(shard_rows, num_samples - first)
        if shard.integer("first_row", low=0) != first:
            raise shard.fail("first_row", f"is {entry['first_row']}, expected {first} (shards are contiguous)")
        if shard.integer("rows", low=1) != rows:
            raise shard.fail("rows", f"is {entry['rows']}, expected {rows}")
        shard.integer("bytes", low=8)
        shard.digest("sha256")
        if tokens:  # a token cache's shard also says how many scored-token rows it holds
            shard.integer("tokens", low=0)
