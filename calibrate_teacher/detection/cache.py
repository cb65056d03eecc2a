"""Soft labels of dense detectors: each image's top pre-NMS candidates with calibrated logits z/T.

Dense-detector KD (RetinaNet, FCOS, YOLO) distils per-candidate class logits before NMS, so those
can be computed once and cached. (Two-stage KD runs the teacher's box head on the *student's*
proposals every step: there the baked teacher, not a cache, is the hand-off; see
docs/detection.md.)

A cache is a folder:

* ``manifest.json``: ``format`` (:data:`FORMAT`), ``format_version``, tool version, the
  teacher (path, sha256, format, head, background, classes), the calibration (T), the
  layout (``dense``: ``logits [R, K]``; ``topk``: softmax heads' top-k of z/T + the full-row
  logsumexp), the selection that cut the candidates (``top_candidates`` per image, ranked by
  the max foreground score at T, times sigmoid(objectness) where the head has one), the data
  (number of images, a hash of the image-id order) and the shards (images, rows, sha256).
* ``shard-NNNNN.safetensors``: for a run of images, ``image_id`` int64 ``[n]``, ``offsets``
  int64 ``[n + 1]`` (image i's candidates are rows ``offsets[i]:offsets[i+1]``), ``boxes``
  float32 ``[R, 4]`` (xyxy, *original* image pixels), then ``logits`` ``[R, K]`` or
  ``topk_index`` int32 / ``topk_logits`` / ``lse`` float32, and ``objectness`` float32 ``[R]``
  (raw, T never touches it) where the head has one. Stored values are ``z / T`` computed in
  float64 and rounded once to the stored dtype.

Shards are written with the classification cache's byte-stable writer
(:mod:`calibrate_teacher.soft_labels._safetensors`) into a temporary folder that is renamed
into place once complete (:func:`calibrate_teacher._io.atomic_output`); memory holds one shard.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Literal

from calibrate_teacher._io import atomic_output, sha256_file
from calibrate_teacher._validate import validate_temperature
from calibrate_teacher._version import tool_version
from calibrate_teacher.detection.base import DetectionBatch, DetectionTeacher, foreground_scores, to_original
from calibrate_teacher.errors import CacheError, InvalidValueError
from calibrate_teacher.soft_labels._safetensors import encode_header, parse_header

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = [
    "CachedDetections",
    "DetectionCache",
    "DetectionCacheInfo",
    "export_detection_soft_labels",
    "open_detection_cache",
]

FORMAT = "calibrate-teacher-detection-soft-labels"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LogitDtype = Literal["float32", "float16"]


@dataclass(frozen=True)
class DetectionCacheInfo:
    """What an export wrote.

    Attributes:
        path: The cache folder.
        num_images: Images cached.
        num_candidates: Candidate rows cached, over all images.
        temperature: T the stored logits are divided by.
        layout: ``dense`` or ``topk``.
        top_candidates: The per-image cut.
        shards: Shard files written.
    """

    path: Path
    num_images: int
    num_candidates: int
    temperature: float
    layout: str
    top_candidates: int
    shards: int

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict."""
        return {
            "path": str(self.path),
            "num_images": self.num_images,
            "num_candidates": self.num_candidates,
            "temperature": self.temperature,
            "layout": self.layout,
            "top_candidates": self.top_candidates,
            "shards": self.shards,
        }


def shard_name(index: int) -> str:
    """``shard-00000.safetensors``."""
    return f"shard-{index:05d}.safetensors"


def export_detection_soft_labels(
    teacher: DetectionTeacher,
    data: Iterable[DetectionBatch],
    out: str | os.PathLike[str],
    *,
    temperature: float,
    top_candidates: int = 100,
    top_k: int | None = None,
    dtype: LogitDtype = "float32",
    shard_images: int = 1024,
    overwrite: bool = False,
) -> DetectionCacheInfo:
    """Cache each image's top pre-NMS candidates with class logits ``z / T`` (see module docstring).

    Args:
        teacher: A loaded detection teacher.
        data: Detection batches (a COCO source, or any iterable of ``DetectionBatch``).
        out: The cache folder to create.
        temperature: T (finite, > 0).
        top_candidates: Keep at most this many candidates per image, by score at T.
        top_k: Softmax heads only: store the top-k of ``z / T`` and the row logsumexp instead
            of every column (default: every column).
        dtype: Stored dtype of the logits.
        shard_images: Images per shard.
        overwrite: Replace an existing cache folder.

    Returns:
        A :class:`DetectionCacheInfo`.

    Raises:
        InvalidValueError: a bad option, or two images share an id.
        OutputExistsError: ``out`` exists and ``overwrite`` is false.
    """
    value = validate_temperature(temperature)
    for name, number in (("top_candidates", top_candidates), ("shard_images", shard_images)):
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise InvalidValueError(f"{name} {number!r}: expected an integer >= 1")
    if dtype not in ("float32", "float16"):
        raise InvalidValueError(f"dtype {dtype!r}: expected float32 or float16")
    if top_k is not None:
        if teacher.head != "softmax":
            raise InvalidValueError("top_k: only for softmax heads; sigmoid heads store every class logit")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= teacher.num_classes + 1:
            raise InvalidValueError(f"top_k {top_k!r}: expected 1..{teacher.num_classes + 1}")
    layout = "dense" if top_k is None else "topk"
    writer = _Writer(value, top_candidates, top_k, dtype, shard_images)
    with atomic_output(out, overwrite=overwrite, directory=True) as folder:
        writer.folder = folder
        for batch in data:
            detections = teacher.detect(batch.images)
            for image_id, found, transform in zip(batch.image_ids, detections, batch.transforms, strict=True):
                writer.add(int(image_id), to_original(found, transform))
        writer.flush()
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tool_version": tool_version(),
            "teacher": {
                "path": str(teacher.path),
                "sha256": sha256_file(teacher.path) if Path(teacher.path).is_file() else None,
                "format": teacher.format,
                "head": teacher.head,
                "background": teacher.background,
                "num_classes": teacher.num_classes,
                "class_names": list(teacher.class_names) if teacher.class_names else None,
            },
            "calibration": {"temperature": value, "stored": "z / T (objectness raw)"},
            "layout": {"kind": layout, "k": top_k, "dtype": dtype, "shard_images": shard_images},
            "selection": {
                "top_candidates": top_candidates,
                "rank_by": "max foreground score at T (times sigmoid(objectness) where present)",
                "nms": None,
            },
            "boxes": "xyxy, original image pixels",
            "data": {"num_images": len(writer.ids), "image_id_order_sha256": _ids_hash(writer.ids)},
            "shards": writer.shards,
        }
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return DetectionCacheInfo(
        Path(out), len(writer.ids), writer.rows, value, layout, top_candidates, len(writer.shards)
    )


def _ids_hash(ids: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()


class _Writer:
    """Buffers one shard's images and writes it when full."""

    folder: Path

    def __init__(self, temperature: float, top: int, top_k: int | None, dtype: str, shard_images: int) -> None:
        self.temperature, self.top, self.top_k, self.dtype, self.shard_images = (
            temperature,
            top,
            top_k,
            dtype,
            shard_images,
        )
        self.ids: list[int] = []
        self.seen: set[int] = set()
        self.pending: list[tuple[int, dict[str, torch.Tensor]]] = []
        self.shards: list[dict[str, object]] = []
        self.rows = 0

    def add(self, image_id: int, found: object) -> None:
        import torch

        from calibrate_teacher.detection.base import Detections

        assert isinstance(found, Detections)
        if image_id in self.seen:
            raise InvalidValueError(f"image id {image_id} appears twice in the data; image ids must be unique")
        self.seen.add(image_id)
        self.ids.append(image_id)
        scaled = found.logits.double() / self.temperature
        calibrated = type(found)(found.boxes, scaled, found.head, found.background, found.objectness)
        score = foreground_scores(calibrated).max(dim=1).values if len(scaled) else scaled.new_zeros(0)
        keep = torch.argsort(score, descending=True, stable=True)[: self.top]
        rows: dict[str, torch.Tensor] = {"boxes": found.boxes[keep].float()}
        if self.top_k is None:
            rows["logits"] = scaled[keep]
        else:
            top = scaled[keep].topk(self.top_k, dim=1)
            rows["topk_index"] = top.indices.to(torch.int32)
            rows["topk_logits"] = top.values
            rows["lse"] = torch.logsumexp(scaled[keep], dim=1).float()
        if found.objectness is not None:
            rows["objectness"] = found.objectness[keep].float()
        self.pending.append((image_id, rows))
        self.rows += len(keep)
        if len(self.pending) >= self.shard_images:
            self.flush()

    def flush(self) -> None:
        import numpy as np

        from calibrate_teacher.soft_labels._shards import replacing

        if not self.pending:
            return
        index = len(self.shards)
        counts = [len(rows["boxes"]) for _, rows in self.pending]
        arrays: dict[str, np.ndarray] = {
            "image_id": np.asarray([i for i, _ in self.pending], dtype=np.int64),
            "offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        }
        for name in self.pending[0][1]:
            parts = [rows[name] for _, rows in self.pending]
            stacked = np.concatenate([p.numpy() for p in parts])
            if name in ("logits", "topk_logits"):
                stacked = stacked.astype(self.dtype)
            arrays[name] = np.ascontiguousarray(stacked)
        meta = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "shard": str(index),
            "temperature": repr(self.temperature),
        }
        with replacing(self.folder / shard_name(index)) as fh:
            digest = _write_shard(fh, arrays, meta)
        self.shards.append(
            {"name": shard_name(index), "images": len(self.pending), "rows": int(sum(counts)), "sha256": digest}
        )
        self.pending = []


def _write_shard(fh: BinaryIO, arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> str:
    """The classification cache's byte layout (``encode_header``), also for 0-row tensors."""
    import numpy as np

    digest = hashlib.sha256()
    prefix = encode_header(arrays, metadata)
    fh.write(prefix)
    digest.update(prefix)
    for arr in arrays.values():
        data = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
        fh.write(data)
        digest.update(data)
    return digest.hexdigest()


@dataclass(frozen=True)
class CachedDetections:
    """One image's cached candidates.

    Attributes:
        image_id: The image id.
        boxes: float32 ``[N, 4]`` xyxy, original image pixels.
        logits: ``[N, K]`` calibrated logits z/T (``dense`` layout), else None.
        topk_index: int32 ``[N, k]`` (``topk`` layout), else None.
        topk_logits: ``[N, k]`` the top-k of z/T (``topk``), else None.
        lse: float32 ``[N]`` logsumexp of the full row z/T (``topk``), else None.
        objectness: float32 ``[N]`` raw objectness logits, where the head has them.
    """

    image_id: int
    boxes: np.ndarray
    logits: np.ndarray | None
    topk_index: np.ndarray | None = None
    topk_logits: np.ndarray | None = None
    lse: np.ndarray | None = None
    objectness: np.ndarray | None = None


class DetectionCache:
    """Read a detection soft-label cache: random access by image id, memory-mapped shards."""

    def __init__(self, path: str | os.PathLike[str], *, verify: bool = False) -> None:
        """Open the cache at ``path`` (``verify``: check every shard's sha256 first).

        Raises:
            CacheError: the manifest or a shard is missing, of another format, or corrupt.
        """
        self.path = Path(path)
        try:
            self.manifest: dict[str, object] = json.loads((self.path / MANIFEST).read_text())
        except FileNotFoundError:
            raise CacheError(f"{self.path}: no {MANIFEST}; not a (complete) detection cache") from None
        except ValueError as exc:
            raise CacheError(f"{self.path / MANIFEST}: not valid JSON ({exc}); re-export the cache") from exc
        if self.manifest.get("format") != FORMAT or self.manifest.get("format_version") != FORMAT_VERSION:
            raise CacheError(
                f"{self.path}: format {self.manifest.get('format')!r} v{self.manifest.get('format_version')}, "
                f"expected {FORMAT} v{FORMAT_VERSION}; re-export it with this version"
            )
        calibration = self.manifest["calibration"]
        assert isinstance(calibration, dict)
        self.temperature = float(calibration["temperature"])
        shards = self.manifest["shards"]
        assert isinstance(shards, list)
        self._where: dict[int, tuple[int, int]] = {}
        self._headers = []
        self.image_ids: list[int] = []
        for s, shard in enumerate(shards):
            file = self.path / str(shard["name"])
            if verify and sha256_file(file) != shard["sha256"]:
                raise CacheError(f"{file}: its sha256 differs from the manifest's; re-export the cache")
            tensors, _ = parse_header(file)
            self._headers.append((file, tensors))
            ids = self._array(s, "image_id")
            for position, image_id in enumerate(ids.tolist()):
                self._where[int(image_id)] = (s, position)
                self.image_ids.append(int(image_id))

    def _array(self, shard: int, name: str) -> np.ndarray:
        import numpy as np

        file, tensors = self._headers[shard]
        entry = tensors[name]
        if entry.end == entry.start:  # a 0-row tensor (an image without candidates)
            return np.empty(entry.shape, dtype=entry.dtype)
        return np.memmap(file, dtype=entry.dtype, mode="r", offset=entry.start, shape=entry.shape)

    def __len__(self) -> int:
        """Number of images cached."""
        return len(self.image_ids)

    def __contains__(self, image_id: object) -> bool:
        """Whether an image id is cached."""
        return image_id in self._where

    def __getitem__(self, image_id: int) -> CachedDetections:
        """The cached candidates of ``image_id``.

        Raises:
            KeyError: the image is not in the cache.
        """
        shard, position = self._where[int(image_id)]
        offsets = self._array(shard, "offsets")
        a, b = int(offsets[position]), int(offsets[position + 1])
        names = self._headers[shard][1]

        def rows(name: str) -> np.ndarray | None:
            return self._array(shard, name)[a:b] if name in names else None

        boxes = rows("boxes")
        assert boxes is not None
        return CachedDetections(
            image_id=int(image_id),
            boxes=boxes,
            logits=rows("logits"),
            topk_index=rows("topk_index"),
            topk_logits=rows("topk_logits"),
            lse=rows("lse"),
            objectness=rows("objectness"),
        )


def open_detection_cache(path: str | os.PathLike[str], *, verify: bool = False) -> DetectionCache:
    """Open a detection soft-label cache for reading (see :class:`DetectionCache`)."""
    return DetectionCache(path, verify=verify)
