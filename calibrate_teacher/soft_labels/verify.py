"""Checking and describing a cache: what ``calibrate-teacher inspect [--verify]`` reports."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from calibrate_teacher._io import sha256_file
from calibrate_teacher.errors import CacheError
from calibrate_teacher.soft_labels._format import (
    KEYS_NAME,
    MANIFEST_NAME,
    CacheManifest,
    ShardInfo,
    read_manifest,
    receipt_name,
    shard_name,
)
from calibrate_teacher.soft_labels.reader import _Shard
from calibrate_teacher.soft_labels.token_reader import _TokenShard

__all__ = ["CacheDescription", "CacheVerification", "describe_cache", "verify_cache"]


@dataclass(frozen=True)
class CacheVerification:
    """The outcome of checking every file of a cache against its manifest.

    Attributes:
        ok: True when nothing is wrong.
        shards_checked: How many shards were read in full.
        problems: One line per problem, each naming the file.
    """

    ok: bool
    shards_checked: int
    problems: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        """Return the verification as a JSON-ready dict."""
        return {
            "ok": self.ok,
            "shards_checked": self.shards_checked,
            "problems": list(self.problems),
        }


@dataclass(frozen=True)
class CacheDescription:
    """What a cache holds, for ``inspect``.

    Attributes:
        path: The cache folder.
        manifest: Its manifest (complete or not).
        shards_done: Finished shards (all of them once complete).
        bytes_on_disk: Size of the manifest, shards and keys.
        verification: The full check, when asked for.
    """

    path: Path
    manifest: CacheManifest
    shards_done: int
    bytes_on_disk: int
    verification: CacheVerification | None = None

    def to_json(self) -> dict[str, object]:
        """Return the description as a JSON-ready dict (the manifest in full)."""
        return {
            "path": str(self.path),
            "shards_done": self.shards_done,
            "num_shards": self.manifest.num_shards,
            "bytes_on_disk": self.bytes_on_disk,
            "manifest": self.manifest.to_json(),
            "verification": self.verification.to_json() if self.verification else None,
        }


def describe_cache(cache: str | os.PathLike[str], *, verify: bool = False) -> CacheDescription:
    """Summarise a cache folder, finished or not, and optionally verify every file.

    Raises:
        InputError: ``cache`` is not a cache folder.
        CacheError: its manifest is unreadable, or damaged (the message names the field).
    """
    path = Path(cache)
    manifest = read_manifest(path)
    # One listing of the folder, not a look-up per shard: the cost follows the files present.
    sizes = {entry.name: entry.stat().st_size for entry in os.scandir(path) if entry.is_file()}
    if manifest.complete:
        done = manifest.num_shards
    else:
        done = sum(
            receipt_name(s) in sizes and shard_name(s) in sizes
            for s in _listed_shards(sizes, manifest.num_shards)
        )
    ours = {MANIFEST_NAME, KEYS_NAME}
    size = sum(
        n for name, n in sizes.items()
        if name in ours or (name.startswith("shard-") and name.endswith(".safetensors"))
    )
    return CacheDescription(
        path=path,
        manifest=manifest,
        shards_done=done,
        bytes_on_disk=size,
        verification=verify_cache(path) if verify else None,
    )


def _listed_shards(names: Iterable[str], num_shards: int) -> list[int]:
    """The shard numbers below ``num_shards`` that have a file of the form shard-NNNNN.safetensors."""
    numbers = []
    for name in names:
        stem = name.removeprefix("shard-").removesuffix(".safetensors")
        if name.startswith("shard-") and name.endswith(".safetensors") and stem.isdigit():
            number = int(stem)
            if number < num_shards and shard_name(number) == name:
                numbers.append(number)
    return numbers


def verify_cache(cache: str | os.PathLike[str]) -> CacheVerification:
    """Check every shard's checksum, header, shapes and row numbers, and ``keys.txt``.

    Problems are returned, not raised, so that all of them are listed at once.

    Raises:
        InputError: ``cache`` is not a cache folder.
        CacheError: its manifest is unreadable, or damaged (the message names the field).
    """
    import numpy as np

    path = Path(cache)
    manifest = read_manifest(path)
    if not manifest.complete:
        return CacheVerification(
            ok=False,
            shards_checked=0,
            problems=(f"{MANIFEST_NAME}: the cache is incomplete; rerun the export to finish it",),
        )
    problems: list[str] = []
    # read_manifest has checked the shard list: names, contiguous rows summing to N, checksums
    for number, info in enumerate(manifest.shards):
        file = path / info.file
        if not file.is_file():
            problems.append(f"{info.file}: missing")
            continue
        digest = sha256_file(file)
        if digest != info.sha256:
            problems.append(
                f"{info.file}: checksum mismatch (manifest {info.sha256[:12]}..., "
                f"file {digest[:12]}...); the shard is corrupt: re-export the cache"
            )
            continue
        if manifest.layout.unit == "token":
            problems.extend(_token_shard_problems(file, manifest, number, info))
            continue
        try:
            shard = _Shard(file, manifest, number, info, verify=False)  # hashed just above
        except CacheError as exc:
            problems.append(str(exc))
            continue
        last = info.first_row + info.rows - 1
        expected = np.arange(info.first_row, last + 1, dtype=np.int64)
        if not np.array_equal(shard.sample_index, expected):
            problems.append(f"{info.file}: sample_index is not rows {info.first_row}..{last}")
        labels = shard.label
        if labels.size and (labels.min() < -1 or labels.max() >= manifest.num_classes):
            problems.append(f"{info.file}: labels outside [-1, {manifest.num_classes - 1}]")
        if (
            shard.index is not None
            and shard.index.size
            and (shard.index.min() < 0 or shard.index.max() >= manifest.num_classes)
        ):
            problems.append(f"{info.file}: topk_index outside [0, {manifest.num_classes - 1}]")
        if not np.isfinite(shard.lse).all():
            problems.append(f"{info.file}: lse holds NaN or Inf")
    keys = path / KEYS_NAME
    if not keys.is_file():
        problems.append(f"{KEYS_NAME}: missing")
    else:
        if sha256_file(keys) != manifest.data.get("order_sha256"):
            problems.append(f"{KEYS_NAME}: checksum differs from the manifest's data.order_sha256")
        with open(keys, "rb") as fh:
            lines = sum(block.count(b"\n") for block in iter(lambda: fh.read(1 << 20), b""))
        if lines != manifest.num_samples:
            problems.append(f"{KEYS_NAME}: {lines} keys for {manifest.num_samples} rows")
    return CacheVerification(
        ok=not problems, shards_checked=len(manifest.shards), problems=tuple(problems)
    )


def _token_shard_problems(file: Path, manifest: CacheManifest, number: int, info: ShardInfo) -> list[str]:
    """What is wrong with one token shard (checksum already checked): header, rows, ranges."""
    import numpy as np

    try:
        shard = _TokenShard(file, manifest, number, info, verify=False)
    except CacheError as exc:
        return [str(exc)]
    problems = []
    a = shard.arrays
    last = info.first_row + info.rows - 1
    if not np.array_equal(a["sample_index"], np.arange(info.first_row, last + 1, dtype=np.int64)):
        problems.append(f"{info.file}: sample_index is not sequences {info.first_row}..{last}")
    v = manifest.num_classes
    if shard.index is not None and shard.index.size and (shard.index.min() < 0 or shard.index.max() >= v):
        problems.append(f"{info.file}: topk_index outside [0, {v - 1}]")
    if a["input_ids"].size and a["input_ids"].min() < 0:
        problems.append(f"{info.file}: negative input_ids")
    lengths = np.diff(shard.ids_offsets)
    owner = np.repeat(np.arange(info.rows), np.diff(shard.seq_offsets))
    if a["position"].size and (a["position"].min() < 0 or bool((a["position"] >= lengths[owner]).any())):
        problems.append(f"{info.file}: a scored position lies outside its sequence")
    if not np.isfinite(a["lse"]).all():
        problems.append(f"{info.file}: lse holds NaN or Inf")
    return problems
