"""The soft-label cache format: the folder's files, the manifest and what it records.

A cache is a folder::

    manifest.json              what, from what, at which temperature, and every shard's checksum
    shard-00000.safetensors    rows [0, shard_rows), then shard-00001 ... (row ranges are fixed
    shard-00001.safetensors    by shard_rows, so any number of writers produce the same shards)
    keys.txt                   one stable sample key per row, in row order

The shard bytes are in ``_safetensors.py`` and the ``calibration`` block in ``_calibration.py``;
``docs/cache-format.md`` is the full specification.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast

from calibrate_teacher._version import tool_version
from calibrate_teacher.errors import CacheError, InputError
from calibrate_teacher.soft_labels._calibration import Calibration
from calibrate_teacher.soft_labels._validate import check_manifest_doc

FORMAT = "calibrate-teacher.soft-labels"
#: The newest format version this package reads and writes. Version 2 added token caches
#: (``layout.unit = "token"``); classification caches are still written as version 1, byte for
#: byte as before, so older readers keep reading them.
FORMAT_VERSION = 2
#: The version a classification (one row per sample) cache is written as.
SAMPLE_FORMAT_VERSION = 1
#: The version a token cache (one row per scored token) is written as.
TOKEN_FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
KEYS_NAME = "keys.txt"
VALUES_DOC = "teacher logits / temperature"
FP16_MAX = 65504.0
SHARD_PATTERN = "shard-{:05d}.safetensors"
#: A manifest larger than this is not read (a million shards take about 200 MB).
MAX_MANIFEST_BYTES = 512 << 20

LayoutKind = Literal["dense", "topk"]
#: What a row is: a sample (classification) or a scored token of a sequence.
RowUnit = Literal["sample", "token"]


def shard_name(shard: int) -> str:
    """Return the file name of shard number ``shard`` (``shard-00007.safetensors``)."""
    return SHARD_PATTERN.format(shard)


def receipt_name(shard: int) -> str:
    """Return the hidden file that records a finished shard until the manifest is complete."""
    return f".shard-{shard:05d}.receipt.json"



def canonical_json(value: object) -> str:
    """JSON with sorted keys and no spaces: the same value always gives the same text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


@dataclass(frozen=True)
class CacheLayout:
    """How rows are stored: dense fp16 logits, or the top-k classes of each row.

    Attributes:
        kind: ``"dense"`` or ``"topk"``.
        k: The number of classes kept per row (``None`` for dense).
        num_classes: C (for a token cache: the vocabulary size V).
        shard_rows: Samples per shard (the last shard may hold fewer); for a token cache the
            samples are sequences, each holding one row per scored token.
        unit: ``"sample"`` (one row per sample) or ``"token"`` (one row per scored token).
    """

    kind: LayoutKind
    k: int | None
    num_classes: int
    shard_rows: int
    unit: RowUnit = "sample"

    @property
    def format_version(self) -> int:
        """The format version a cache of this layout is written as (1 samples, 2 tokens)."""
        return TOKEN_FORMAT_VERSION if self.unit == "token" else SAMPLE_FORMAT_VERSION

    @property
    def index_dtype(self) -> str | None:
        """``int16`` when C fits it, else ``int32``; None for dense."""
        if self.kind == "dense":
            return None
        return "int16" if self.num_classes <= 32767 else "int32"

    @property
    def width(self) -> int:
        """Values stored per row: C (dense) or k."""
        return self.num_classes if self.k is None else self.k

    def to_json(self) -> dict[str, object]:
        """Return the manifest's ``layout`` block (``unit`` and ``input_ids_dtype`` for tokens only)."""
        block: dict[str, object] = {
            "kind": self.kind,
            "k": self.k,
            "num_classes": self.num_classes,
            "shard_rows": self.shard_rows,
            "values": VALUES_DOC,
            "logits_dtype": "float16",
            "index_dtype": self.index_dtype,
            "lse_dtype": "float32",
        }
        if self.unit == "token":
            block["unit"] = "token"
            block["input_ids_dtype"] = "int32"
        return block


@dataclass(frozen=True)
class ShardInfo:
    """One shard as the manifest lists it (``tokens``: its scored-token rows, token caches only)."""

    file: str
    first_row: int
    rows: int
    bytes: int
    sha256: str
    tokens: int | None = None


@dataclass(frozen=True)
class CacheManifest:
    """The contents of ``manifest.json``.

    Attributes:
        teacher: ``file``, ``sha256``, ``format``, ``num_classes`` (and ``arch`` where used).
        data: ``source`` (the data source's description), ``num_samples`` and ``order_sha256``
            (SHA-256 of ``keys.txt``: the sample order), the latter once complete.
        calibration: T and how it was chosen.
        layout: Dense or top-k, and the shard size.
        run_id: SHA-256 of what determines the bytes (teacher, data, T, layout); every shard
            header carries it, so shards of different runs are never mixed.
        complete: False while an export is running or was interrupted.
        shards: Every shard with its rows and checksum (empty until complete).
        created_at: UTC time the cache was completed (ISO 8601), or None.
        tool_version: The calibrate-teacher version that wrote it.
        format_version: The cache format version.
    """

    teacher: Mapping[str, object]
    data: Mapping[str, object]
    calibration: Calibration
    layout: CacheLayout
    run_id: str
    complete: bool = False
    shards: tuple[ShardInfo, ...] = ()
    created_at: str | None = None
    tool_version: str = field(default_factory=tool_version)
    format_version: int = SAMPLE_FORMAT_VERSION

    @property
    def num_samples(self) -> int:
        """N, the number of rows."""
        return int(cast(int, self.data["num_samples"]))

    @property
    def num_classes(self) -> int:
        """C, the number of classes."""
        return self.layout.num_classes

    @property
    def temperature(self) -> float:
        """The calibration temperature T the values were divided by."""
        return self.calibration.temperature

    @property
    def num_shards(self) -> int:
        """How many shards the complete cache has."""
        return -(-self.num_samples // self.layout.shard_rows)

    def to_json(self) -> dict[str, object]:
        """Return the manifest as a JSON-ready dict (the key order is the file's)."""
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "tool_version": self.tool_version,
            "created_at": self.created_at,
            "complete": self.complete,
            "run_id": self.run_id,
            "teacher": dict(self.teacher),
            "data": dict(self.data),
            "calibration": self.calibration.to_json(),
            "layout": self.layout.to_json(),
            "keys": KEYS_NAME,
            "shards": [_shard_json(s) for s in self.shards],
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, object], *, source: str = MANIFEST_NAME) -> CacheManifest:
        """Build a manifest from its JSON form.

        Raises:
            CacheError: not a soft-label manifest, a newer format version, or a missing, mistyped,
            out-of-range or inconsistent field (the message names it).
        """
        if doc.get("format") != FORMAT:
            raise CacheError(f"{source}: not a calibrate-teacher soft-label manifest")
        check_manifest_doc(doc, source=source, format_version=FORMAT_VERSION, shard_name=SHARD_PATTERN)
        version = cast(int, doc["format_version"])
        try:
            if not isinstance(_as_dict(doc["data"]).get("num_samples"), int):
                raise TypeError("data.num_samples is not an integer")
            cal = _as_dict(doc["calibration"])
            lay = _as_dict(doc["layout"])
            metrics = cal.get("metrics")
            return cls(
                teacher=_as_dict(doc["teacher"]),
                data=_as_dict(doc["data"]),
                calibration=Calibration(
                    temperature=float(cal["temperature"]),  # type: ignore[arg-type]
                    method=str(cal.get("method", "fixed")),
                    objective=_opt_str(cal.get("objective")),
                    metrics=_as_dict(metrics) if metrics is not None else None,  # type: ignore[arg-type]
                    report=_opt_str(cal.get("report")),
                ),
                layout=CacheLayout(
                    kind="topk" if lay["kind"] == "topk" else "dense",
                    k=int(lay["k"]) if lay.get("k") is not None else None,  # type: ignore[call-overload]
                    num_classes=int(lay["num_classes"]),  # type: ignore[call-overload]
                    shard_rows=int(lay["shard_rows"]),  # type: ignore[call-overload]
                    unit="token" if lay.get("unit") == "token" else "sample",
                ),
                run_id=str(doc["run_id"]),
                complete=bool(doc["complete"]),
                shards=tuple(
                    ShardInfo(
                        file=str(s["file"]),
                        first_row=int(s["first_row"]),
                        rows=int(s["rows"]),
                        bytes=int(s["bytes"]),
                        sha256=str(s["sha256"]),
                        tokens=int(s["tokens"]) if s.get("tokens") is not None else None,
                    )
                    for s in doc.get("shards", [])  # type: ignore[attr-defined]
                ),
                created_at=_opt_str(doc.get("created_at")),
                tool_version=str(doc.get("tool_version", "unknown")),
                format_version=version,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CacheError(f"{source}: malformed manifest ({type(exc).__name__}: {exc})") from exc


def _shard_json(s: ShardInfo) -> dict[str, object]:
    entry: dict[str, object] = {
        "file": s.file, "first_row": s.first_row, "rows": s.rows, "bytes": s.bytes, "sha256": s.sha256
    }
    if s.tokens is not None:
        entry["tokens"] = s.tokens
    return entry


def _as_dict(value: object) -> dict[str, object]:
    if not isinstance(value, dict):
        raise TypeError(f"expected an object, got {type(value).__name__}")
    return value


def _opt_str(value: object) -> str | None:
    return None if value is None else str(value)


def read_manifest(cache: str | os.PathLike[str]) -> CacheManifest:
    """Read a cache folder's ``manifest.json`` (complete or not).

    Raises:
        InputError: the folder or its manifest does not exist.
        CacheError: the manifest is unreadable, not a soft-label manifest, or has a bad field.
    """
    path = Path(cache) / MANIFEST_NAME
    if not path.is_file():
        raise InputError(
            f"{cache}: not a soft-label cache (no {MANIFEST_NAME}); "
            "create one with `calibrate-teacher export-soft-labels`"
        )
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise CacheError(
                f"{path}: {path.stat().st_size:,} bytes is far too large for a manifest; "
                "the file is damaged: re-export the cache"
            )
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CacheError(f"{path}: unreadable manifest ({exc}); re-export the cache") from exc
    if not isinstance(doc, dict):
        raise CacheError(f"{path}: not a soft-label manifest (expected a JSON object)")
    return CacheManifest.from_json(doc, source=str(path))


def run_id(
    teacher: Mapping[str, object],
    data: Mapping[str, object],
    temperature: float,
    layout: CacheLayout,
) -> str:
    """Return the SHA-256 of everything that determines a cache's bytes."""
    identity = {
        "format_version": layout.format_version,
        "teacher": dict(teacher),
        "data": {"source": data.get("source"), "num_samples": data.get("num_samples")},
        "temperature": float(temperature),
        "layout": layout.to_json(),
    }
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()
