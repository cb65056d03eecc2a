"""Options for detection teachers (COCO data): where the images are, the operating point, the head.

They are one option group (:func:`detection_group`) listed under "Detection" in ``--help``; the
command receives a :class:`DetectionArgs`. A command runs as a detection job when the data is
COCO annotations or the teacher is a detection ONNX (``jobs._route.task_of``), or when a
detector-only flag (``--detection-head``, ``--background``, ``--class-layer``,
``--boxes-output``, ``--scores-output``) says the teacher is a detector.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from calibrate_teacher.cli._specs import OptionGroup

PANEL = "Detection"

HeadChoice = Literal["softmax", "sigmoid"]
BackgroundChoice = Literal["first", "last", "none"]
MatchingChoice = Literal["greedy", "netcal"]

ImagesOpt = Annotated[
    Path | None,
    typer.Option(
        "--images",
        file_okay=False,
        help="COCO data: the image folder of --data annotations.json (default: found beside the json: the "
        "folder, its subfolders or images/*, whichever holds the annotated files).",
    ),
]
ScoreThresholdOpt = Annotated[
    float | None,
    typer.Option(
        "--score-threshold", min=0.0, max=1.0,
        help="Operating point: detections scoring below this are dropped before matching (default 0.3). "
        "Set it to the threshold the teacher is used at.",
    ),
]  # fmt: skip
MaxDetectionsOpt = Annotated[
    int | None,
    typer.Option(
        "--max-detections", min=1, help="Operating point: at most this many detections per image (default 100)."
    ),
]
NmsIouOpt = Annotated[
    float | None,
    typer.Option(
        "--nms-iou", min=0.0, max=1.0,
        help="Operating point: class-wise NMS IoU applied to the candidates (default 0.5; a model with NMS "
        "built in is not suppressed again).",
    ),
]  # fmt: skip
MatchIouOpt = Annotated[
    float | None,
    typer.Option(
        "--match-iou", min=0.0, max=1.0,
        help="Operating point: a detection is a true positive at IoU >= this with a box of its class (default 0.5).",
    ),
]  # fmt: skip
MatchingOpt = Annotated[
    MatchingChoice,
    typer.Option(
        "--matching",
        help="greedy: one-to-one in score order, as COCO evaluates (default); netcal: many-to-one, a detection "
        "is a TP when the box it overlaps most has its class.",
    ),
]
DetectionHeadOpt = Annotated[
    HeadChoice | None,
    typer.Option(
        "--detection-head",
        help="The detector's class head: softmax over C+1 (two-stage, background column) or sigmoid per class "
        "(YOLO, RetinaNet, FCOS). Default: read from the model; checked against it.",
    ),
]
BackgroundOpt = Annotated[
    BackgroundChoice | None,
    typer.Option(
        "--background",
        help="A softmax head's background column: first (torchvision), last (detectron2); none for sigmoid "
        "heads. Default: read from the model where it can be.",
    ),
]
BoxesOutputOpt = Annotated[
    str | None,
    typer.Option("--boxes-output", help="ONNX with named outputs: the boxes output [B, N, 4] (xyxy pixels)."),
]
ScoresOutputOpt = Annotated[
    str | None,
    typer.Option(
        "--scores-output",
        help="ONNX with named outputs: the scores output [B, N, K], ending in a Sigmoid or Softmax.",
    ),
]
ClassLayerOpt = Annotated[
    str | None,
    typer.Option(
        "--class-layer",
        help="State dict + --arch: the class-logit layer (the only one a bake divides by T), where it is not "
        "roi_heads.box_predictor.cls_score or head.classification_head.cls_logits; needs --detection-head.",
    ),
]
TopCandidatesOpt = Annotated[
    int,
    typer.Option(
        "--top-candidates", min=1,
        help="Detection caches: keep each image's this many best pre-NMS candidates (ranked by score at T).",
    ),
]  # fmt: skip


@dataclass(frozen=True)
class DetectionArgs:
    """The detection flags as given (None: not given)."""

    images: Path | None = None
    score_threshold: float | None = None
    max_detections: int | None = None
    nms_iou: float | None = None
    match_iou: float | None = None
    matching: MatchingChoice = "greedy"
    detection_head: HeadChoice | None = None
    background: BackgroundChoice | None = None
    boxes_output: str | None = None
    scores_output: str | None = None
    class_layer: str | None = None
    top_candidates: int = 100

    @property
    def names_a_detector(self) -> bool:
        """True when a detector-only flag was given (the teacher is then a detector)."""
        return any(
            v is not None
            for v in (self.detection_head, self.background, self.boxes_output, self.scores_output, self.class_layer)
        )

    @property
    def given(self) -> list[str]:
        """The flags given, as typed (for "does not apply" messages)."""
        defaults = DetectionArgs()
        return [f"--{name.replace('_', '-')}" for name in _FIELDS if getattr(self, name) != getattr(defaults, name)]


_FIELDS = (
    "images", "score_threshold", "max_detections", "nms_iou", "match_iou", "matching", "detection_head",
    "background", "boxes_output", "scores_output", "class_layer", "top_candidates",
)  # fmt: skip


def _build(own: dict[str, Any], values: dict[str, Any]) -> object:
    return DetectionArgs(**values)


def detection_group(*, images: bool = True, operating_point: bool = True, cache: bool = False) -> OptionGroup:
    """The detection options: how to load the detector, plus ``--images`` and the operating point where asked."""
    loading: tuple[tuple[str, object, object], ...] = (
        ("detection_head", DetectionHeadOpt, None),
        ("background", BackgroundOpt, None),
        ("boxes_output", BoxesOutputOpt, None),
        ("scores_output", ScoresOutputOpt, None),
        ("class_layer", ClassLayerOpt, None),
    )
    point: tuple[tuple[str, object, object], ...] = (
        ("score_threshold", ScoreThresholdOpt, None),
        ("max_detections", MaxDetectionsOpt, None),
        ("nms_iou", NmsIouOpt, None),
        ("match_iou", MatchIouOpt, None),
        ("matching", MatchingOpt, "greedy"),
    )
    reading: tuple[tuple[str, object, object], ...] = (("images", ImagesOpt, None),) if images else ()
    caching: tuple[tuple[str, object, object], ...] = (("top_candidates", TopCandidatesOpt, 100),) if cache else ()
    options = reading + (point if operating_point else ()) + loading + caching
    return OptionGroup("detection", PANEL, options, _build)


__all__ = ["DetectionArgs", "detection_group"]
