"""The COCO data source object: image decoding per batch (optionally in workers) and the ground truth.

:func:`calibrate_teacher.detection.coco.open_coco` parses and validates the annotation file and
builds a :class:`CocoSource`; this module holds what the source does afterwards.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from calibrate_teacher.data._loader import batch_order
from calibrate_teacher.data._walk import _NotRegularFileError, _open_regular
from calibrate_teacher.detection._transform import DetectionPreprocess
from calibrate_teacher.detection.base import BackgroundLayout, DetectionBatch, GroundTruth, ImageTransform
from calibrate_teacher.errors import InputError, InvalidValueError

if TYPE_CHECKING:
    import torch

__all__ = ["Annotation", "CocoSource"]

#: One ground-truth box: x1, y1, x2, y2, model class, crowd, area.
Annotation = tuple[float, float, float, float, int, bool, float]


@dataclass(frozen=True)
class _Chunk:
    images: torch.Tensor
    indices: tuple[int, ...]
    transforms: tuple[ImageTransform, ...]
    bad: tuple[tuple[int, str], ...]


class _Reader:
    # Picklable: worker processes get the folder, the file names, the sizes and the config.
    def __init__(
        self, root: Path, files: tuple[str, ...], sizes: tuple[tuple[int, int], ...], config: DetectionPreprocess
    ) -> None:
        self.root, self.files, self.sizes, self.config = root, files, sizes, config

    def read(self, indices: list[int]) -> _Chunk:
        import torch
        from PIL import Image, UnidentifiedImageError

        from calibrate_teacher.detection._transform import preprocess_detection_image

        decode_errors = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)
        tensors, good, transforms, bad = [], [], [], []
        for index in indices:
            try:
                with _open_regular(self.root / self.files[index]) as fp, Image.open(fp) as image:
                    image.load()
                    if image.size != self.sizes[index]:
                        w, h = self.sizes[index]
                        bad.append(
                            (index, f"the image is {image.width}x{image.height} but the annotations say {w}x{h}")
                        )
                        continue
                    x, transform = preprocess_detection_image(image, self.config)
            except _NotRegularFileError as exc:
                bad.append((index, str(exc)))
                continue
            except UnidentifiedImageError:
                bad.append((index, "UnidentifiedImageError: no image format recognises the file"))
                continue
            except decode_errors as exc:
                bad.append((index, f"{type(exc).__name__}: {exc}"))
                continue
            tensors.append(x)
            transforms.append(transform)
            good.append(index)
        h, w = self.config.input_size
        images = torch.stack(tensors) if tensors else torch.empty((0, 3, h, w))
        return _Chunk(images, tuple(good), tuple(transforms), tuple(bad))


class _ChunkDataset:
    def __init__(self, reader: _Reader, length: int) -> None:
        self.reader, self.length = reader, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, indices: list[int]) -> _Chunk:
        return self.reader.read(indices)


def _keep(chunk: _Chunk) -> _Chunk:
    return chunk


class CocoSource:
    """COCO images with their ground truth, preprocessed for one detection teacher.

    Attributes:
        path: The annotation file.
        images: The image folder.
        num_classes: Foreground classes C of the model.
        class_names: Class names in model order.
        category_ids: The COCO category id of each model class (-1: no category in the file).
        background: The background layout stated by the caller (None: taken from the teacher).
        config: The preprocessing applied.
        notes: One-line remarks (defaults that stood in for something not given).
        description: What the source is, JSON-ready.
        skipped: ``(key, reason)`` of images and annotations skipped with ``skip_bad``.
    """

    def __init__(
        self,
        path: Path,
        images: Path,
        *,
        files: tuple[str, ...],
        image_ids: tuple[int, ...],
        sizes: tuple[tuple[int, int], ...],
        annotations: tuple[tuple[Annotation, ...], ...],
        class_names: tuple[str, ...],
        category_ids: tuple[int, ...],
        background: BackgroundLayout | None,
        config: DetectionPreprocess,
        notes: list[str],
        description: dict[str, object],
        skipped: list[tuple[str, str]],
        skip_bad: bool,
    ) -> None:
        self.path, self.images = path, images
        self.num_classes = len(class_names)
        self.class_names: tuple[str, ...] | None = class_names
        self.category_ids = category_ids
        self.background = background
        self.config = config
        self.notes = notes
        self.description = description
        self.skipped = skipped
        self.skip_bad = skip_bad
        self._image_ids = image_ids
        self._annotations = annotations
        self._reader = _Reader(images, files, sizes, config)

    def __len__(self) -> int:
        """Return the number of images."""
        return len(self._image_ids)

    def key(self, index: int) -> str:
        """The ``file_name`` of the image at ``index``."""
        return self._reader.files[index]

    def image_id(self, index: int) -> int:
        """The COCO image id of the image at ``index``."""
        return self._image_ids[index]

    def ground_truth(self, index: int) -> GroundTruth:
        """The annotated boxes of the image at ``index`` (xyxy, original pixels)."""
        import torch

        rows = self._annotations[index]
        boxes = torch.tensor([r[:4] for r in rows], dtype=torch.float32).reshape(-1, 4)
        return GroundTruth(
            boxes=boxes,
            labels=torch.tensor([r[4] for r in rows], dtype=torch.int64),
            crowd=torch.tensor([r[5] for r in rows], dtype=torch.bool),
        )

    def coco_ground_truth(self, indices: Sequence[int] | None = None) -> dict[str, object]:
        """A COCO ground-truth dict (for pycocotools) of the images at ``indices`` (default all).

        Only classes with a category id appear; areas are the json's (else ``w * h``).
        """
        chosen = range(len(self)) if indices is None else indices
        images: list[dict[str, object]] = []
        annotations: list[dict[str, object]] = []
        for index in chosen:
            w, h = self._reader.sizes[index]
            images.append({"id": self._image_ids[index], "width": w, "height": h})
            for x1, y1, x2, y2, label, crowd, area in self._annotations[index]:
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": self._image_ids[index],
                        "category_id": self.category_ids[label],
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "area": area,
                        "iscrowd": int(crowd),
                    }
                )
        categories = [
            {"id": cid, "name": name}
            for cid, name in zip(self.category_ids, self.class_names or (), strict=True)
            if cid >= 0
        ]
        return {"images": images, "annotations": annotations, "categories": categories}

    def batches(
        self, *, batch_size: int, workers: int = 0, pin_memory: bool = False, indices: Sequence[int] | None = None
    ) -> Iterator[DetectionBatch]:
        """Yield preprocessed batches with their ground truth, in file order (or ``indices`` order).

        Raises:
            InputError: an image cannot be decoded (or its size differs from the json's) and
                ``skip_bad`` is false.
            InvalidValueError: ``batch_size`` / ``workers`` / ``indices`` out of range.
        """
        from torch.utils.data import DataLoader

        if workers < 0:
            raise InvalidValueError(f"workers: expected 0 or more, got {workers}")
        plan = batch_order(len(self), batch_size=batch_size, indices=indices)
        if not plan:
            return
        loader: DataLoader[_Chunk] = DataLoader(
            _ChunkDataset(self._reader, len(self)),  # type: ignore[arg-type]  # map-style by index lists
            batch_size=None,
            sampler=plan,
            num_workers=workers,
            collate_fn=_keep,  # type: ignore[arg-type]
            pin_memory=False,
            prefetch_factor=4 if workers > 0 else None,
        )
        for chunk in loader:
            for index, reason in chunk.bad:
                if not self.skip_bad:
                    raise InputError(
                        f"{self.images / self.key(index)}: cannot read the image ({reason}); "
                        "replace or remove it, or pass --skip-bad to skip unreadable images"
                    )
                if (self.key(index), reason) not in self.skipped:
                    self.skipped.append((self.key(index), reason))
            if not chunk.indices:
                continue
            images = chunk.images.pin_memory() if pin_memory else chunk.images
            yield DetectionBatch(
                images=images,
                image_ids=tuple(self._image_ids[i] for i in chunk.indices),
                transforms=chunk.transforms,
                targets=tuple(self.ground_truth(i) for i in chunk.indices),
            )

    def indices_of(self, image_ids: Sequence[int]) -> list[int]:
        """Positions of the given image ids."""
        position = {image_id: i for i, image_id in enumerate(self._image_ids)}
        return [position[i] for i in image_ids]
