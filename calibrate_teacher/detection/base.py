"""What a detection teacher hands over, and what a detection data source yields.

A detection teacher returns, per image, its *candidate* boxes before any score threshold or NMS
(or after its own, where the model bakes NMS in: ``Detections.nms_applied``), each with its class
logits and the kind of head that turns them into scores:

- ``softmax``: ``logits`` is ``[N, C + 1]`` with one background column at ``background``
  (``"first"``: torchvision's layout; ``"last"``: detectron2's); a box's class score is
  ``softmax(logits)[c]``.
- ``sigmoid``: ``logits`` is ``[N, C]`` (``background == "none"``); a class score is
  ``sigmoid(logits[c])`` (RetinaNet, FCOS, YOLOv5/v8 class rows), times ``sigmoid(objectness)``
  where the head has one (YOLOX).

Temperature scaling divides ``logits`` (never boxes, never objectness) by T.

Boxes are ``xyxy`` in the *original* image's pixels: a data source that letterboxes or resizes
records, per image, the affine map back (:class:`ImageTransform`), and
:func:`to_original` applies it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from calibrate_teacher.teachers.base import InputSpec

HeadKind = Literal["softmax", "sigmoid"]
BackgroundLayout = Literal["first", "last", "none"]


@dataclass(frozen=True)
class ImageTransform:
    """How an original image was mapped to the model input: ``x_in = x_orig * scale + pad``.

    Attributes:
        scale_x: Horizontal scale factor (input pixels per original pixel).
        scale_y: Vertical scale factor.
        pad_x: Left padding in input pixels (letterbox), 0 for a plain resize.
        pad_y: Top padding in input pixels.
        width: Original image width in pixels.
        height: Original image height in pixels.
    """

    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float
    width: int
    height: int


@dataclass(frozen=True)
class Detections:
    """One image's candidate boxes from a detection teacher.

    Attributes:
        boxes: float32 ``[N, 4]`` xyxy, in model-input pixels as the teacher returns them, in
            original-image pixels after :func:`to_original`.
        logits: float32 class logits ``[N, K]`` (softmax: ``K = C + 1``; sigmoid: ``K = C``).
        head: ``"softmax"`` or ``"sigmoid"``.
        background: Where the background column sits (softmax heads), ``"none"`` for sigmoid.
        objectness: float32 objectness logits ``[N]`` (YOLOX-style heads), else None.
        nms_applied: True when the model already ran NMS on these boxes.
    """

    boxes: torch.Tensor
    logits: torch.Tensor
    head: HeadKind
    background: BackgroundLayout
    objectness: torch.Tensor | None = None
    nms_applied: bool = False


@dataclass(frozen=True)
class GroundTruth:
    """One image's annotated boxes, in original-image pixels.

    Attributes:
        boxes: float32 ``[M, 4]`` xyxy.
        labels: int64 ``[M]`` foreground class indices of the model (0..C-1).
        crowd: bool ``[M]``: COCO ``iscrowd`` regions (matches to them are ignored, not counted
            as false positives, as COCO does).
    """

    boxes: torch.Tensor
    labels: torch.Tensor
    crowd: torch.Tensor


@dataclass(frozen=True)
class DetectionBatch:
    """A batch of preprocessed images with their annotations.

    Attributes:
        images: float32 ``[B, 3, H, W]`` model inputs.
        image_ids: The COCO image id of each image.
        transforms: The map from each original image to its model input.
        targets: The ground truth of each image.
    """

    images: torch.Tensor
    image_ids: tuple[int, ...]
    transforms: tuple[ImageTransform, ...]
    targets: tuple[GroundTruth, ...]


@runtime_checkable
class DetectionTeacher(Protocol):
    """A loaded detection teacher.

    Attributes:
        path: The file it was loaded from.
        format: The backend (``"onnx"``, ``"safetensors"``, ``"state_dict"``...).
        num_classes: Foreground classes C.
        head: The head kind of its class logits.
        background: The background column's place (softmax), or ``"none"``.
        class_names: Class names in model order, where the file says; else None.
        input_spec: The input the model expects, where the file says.
        device: Where it runs.
        notes: One-line remarks for stderr (defaults that stood in for something not given).
    """

    path: Path
    format: str
    num_classes: int
    head: HeadKind
    background: BackgroundLayout
    class_names: tuple[str, ...] | None
    input_spec: InputSpec | None
    device: str
    notes: list[str]

    def detect(self, images: torch.Tensor) -> list[Detections]:
        """Candidate boxes (model-input pixels) with class logits, one entry per image."""
        ...


@dataclass(frozen=True)
class OperatingPoint:
    """Where detections are cut before they are matched and scored; stated in every report.

    Attributes:
        score_threshold: Detections scoring below this are dropped.
        max_detections: At most this many detections per image (highest scores).
        nms_iou: Class-wise NMS IoU applied to candidates (None: the model's own / none).
        match_iou: IoU at which a detection matches a ground-truth box.
    """

    score_threshold: float = 0.3
    max_detections: int = 100
    nms_iou: float | None = 0.5
    match_iou: float = 0.5

    def to_json(self) -> dict[str, object]:
        """The operating point as a JSON object."""
        return {
            "score_threshold": self.score_threshold,
            "max_detections": self.max_detections,
            "nms_iou": self.nms_iou,
            "match_iou": self.match_iou,
        }


@dataclass(frozen=True)
class DetectionSourceInfo:
    """What a detection data source is, JSON-ready (kept small; the source adds its own keys).

    Attributes:
        path: The annotation file.
        images: The image folder.
        num_images: How many images.
        category_ids: COCO category id of each model class index.
        extra: Anything else the source reports (preprocessing, background layout...).
    """

    path: Path
    images: Path
    num_images: int
    category_ids: tuple[int, ...]
    extra: Mapping[str, object] = field(default_factory=dict)


def to_original(detections: Detections, transform: ImageTransform) -> Detections:
    """Map a teacher's boxes from model-input pixels back to the original image (clipped)."""
    import torch

    b = detections.boxes
    scale = torch.tensor([transform.scale_x, transform.scale_y] * 2, dtype=b.dtype)
    pad = torch.tensor([transform.pad_x, transform.pad_y] * 2, dtype=b.dtype)
    out = (b - pad) / scale
    limit = torch.tensor([transform.width, transform.height] * 2, dtype=b.dtype)
    out = torch.minimum(out.clamp(min=0), limit)
    return Detections(
        boxes=out,
        logits=detections.logits,
        head=detections.head,
        background=detections.background,
        objectness=detections.objectness,
        nms_applied=detections.nms_applied,
    )


def foreground_scores(detections: Detections) -> torch.Tensor:
    """Per-class scores ``[N, C]`` of the foreground classes, as the head defines them."""
    import torch

    z = detections.logits.to(torch.float64)
    if detections.head == "softmax":
        p = torch.softmax(z, dim=1)
        p = p[:, 1:] if detections.background == "first" else p[:, :-1]
    else:
        p = torch.sigmoid(z)
        if detections.objectness is not None:
            p = p * torch.sigmoid(detections.objectness.to(torch.float64))[:, None]
    return p


__all__ = [
    "BackgroundLayout",
    "DetectionBatch",
    "DetectionSourceInfo",
    "DetectionTeacher",
    "Detections",
    "GroundTruth",
    "HeadKind",
    "ImageTransform",
    "OperatingPoint",
    "foreground_scores",
    "to_original",
]
