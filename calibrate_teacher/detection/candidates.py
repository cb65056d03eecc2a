"""The candidate pool: each image's top (box, class) pairs, rescored and cut at any temperature.

A *detection* is a (candidate box, class) pair, as torchvision's, detectron2's and ultralytics'
(``multi_label=True``) evaluation post-processing produce them. The pool keeps, per image, the
pairs scoring at least ``floor`` at ``T = 1`` (at most ``max_candidates``, the highest), with
their candidates' boxes (original pixels) and class logits; that selection is made once, at
``T = 1``. :func:`detections_at` then rescores every kept pair at ``T`` (``logits / T``; boxes
and objectness unchanged) and cuts it at the operating point exactly as a deployed detector
would: score threshold, class-wise NMS (skipped when the model ran its own), the
``max_detections`` highest per image; then matches them.

So the detections at ``T`` are exact as long as no pair below ``floor`` at ``T = 1`` would pass
the threshold at ``T``: for a sigmoid head without objectness that holds for every
``T <= logit(floor) / logit(threshold)`` (every ``T`` when ``threshold >= 0.5``), see
:attr:`CandidatePool.exact_up_to`. Memory: ``max_candidates`` pairs per image (their
candidates' ``K`` logits and boxes), the part of a run that grows with N.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from calibrate_teacher.detection.base import Detections, OperatingPoint, foreground_scores
from calibrate_teacher.detection.matching import Matching, match_detections
from calibrate_teacher.detection.metrics import DetectionRecords, box_position_features
from calibrate_teacher.errors import InvalidValueError

if TYPE_CHECKING:
    import torch

    from calibrate_teacher.detection.base import BackgroundLayout, GroundTruth, HeadKind

__all__ = [
    "CandidatePool",
    "ImageCandidates",
    "coco_results",
    "detections_at",
    "detections_at_reference",
    "pair_scores",
    "softmax_rows",
]


@dataclass(frozen=True)
class ImageCandidates:
    """One image's kept pairs.

    Attributes:
        image_id: The COCO image id.
        width: Original width in pixels.
        height: Original height in pixels.
        boxes: float32 ``[n, 4]`` the kept candidates' boxes (original pixels).
        logits: float32 class-logit rows: ``[n, K]`` (softmax: every kept candidate); sigmoid heads
            keep only the rows of candidates scoring ``>= row_threshold`` on some class (those an
            NLL fit at that threshold can use), ``row_of`` says which.
        row_of: int64 ``[n]``: each candidate's row in ``logits`` (-1: not kept); None: row i is candidate i.
        pair_logit: float32 ``[p]`` the class logit of each pair (sigmoid heads), else empty.
        objectness: float32 ``[n]`` their objectness logits, or None.
        pair_candidate: int64 ``[p]`` the candidate of each pair.
        pair_class: int64 ``[p]`` the foreground class of each pair.
        nms_applied: The model ran NMS itself.
        target: The image's ground truth.
    """

    image_id: int
    width: int
    height: int
    boxes: torch.Tensor
    logits: torch.Tensor
    row_of: torch.Tensor | None
    pair_logit: torch.Tensor
    objectness: torch.Tensor | None
    pair_candidate: torch.Tensor
    pair_class: torch.Tensor
    nms_applied: bool
    target: GroundTruth


@dataclass
class CandidatePool:
    """Every image's kept pairs, for one head kind.

    Attributes:
        head: The head kind.
        background: The background column (softmax) or ``"none"``.
        num_classes: Foreground classes C.
        floor: Pairs scoring below this at ``T = 1`` are not kept.
        max_candidates: At most this many pairs per image.
        images: The kept pairs of each image, in run order.
        row_threshold: Sigmoid heads keep full logit rows only for candidates scoring at least this
            on some class at ``T = 1`` (set it to the operating point's score threshold).
        capped: Images where ``max_candidates`` cut pairs above ``floor``.
    """

    head: HeadKind
    background: BackgroundLayout
    num_classes: int
    floor: float = 0.001
    max_candidates: int = 1000
    row_threshold: float = 0.0
    images: list[ImageCandidates] = field(default_factory=list)
    capped: int = 0
    _ranked: dict[tuple[OperatingPoint, str], list[torch.Tensor]] = field(default_factory=dict, repr=False)

    def add(self, detections: Detections, target: GroundTruth, *, image_id: int, width: int, height: int) -> None:
        """Keep the top pairs of one image's detections (boxes already in original pixels)."""
        import torch

        if detections.head != self.head or detections.logits.ndim != 2:
            raise InvalidValueError(
                f"detections: expected {self.head} logits [N, K], got {detections.head} {list(detections.logits.shape)}"
            )
        scores = _foreground(detections)
        if scores.shape[1] != self.num_classes:
            raise InvalidValueError(
                f"detections: {scores.shape[1]} foreground classes, the pool has {self.num_classes}"
            )
        flat = scores.reshape(-1)
        chosen = (flat >= self.floor).nonzero().squeeze(1)
        if chosen.numel() > self.max_candidates:
            self.capped += 1
            top = torch.topk(flat[chosen], self.max_candidates).indices
            chosen = chosen[top]
        chosen = chosen.sort().values
        cand, cls = chosen // self.num_classes, chosen % self.num_classes
        kept, remap = torch.unique(cand, return_inverse=True)
        self._ranked.clear()  # a new image invalidates the cut-once lists
        obj = detections.objectness
        logits = detections.logits[kept].to(torch.float32)
        row_of = None
        pair_logit = torch.zeros(0, dtype=torch.float32)
        if self.head == "sigmoid":
            pair_logit = detections.logits[cand, cls].to(torch.float32).clone()
            # Rows for the NLL fit only where a candidate could be a detection at T = 1.
            full = scores[kept].amax(dim=1) >= self.row_threshold if kept.numel() else torch.zeros(0, dtype=torch.bool)
            row_of = torch.full((kept.numel(),), -1, dtype=torch.int64)
            row_of[full] = torch.arange(int(full.sum()), dtype=torch.int64)
            logits = logits[full]
        self.images.append(
            ImageCandidates(
                image_id=image_id,
                width=width,
                height=height,
                boxes=detections.boxes[kept].to(torch.float32).clone(),
                logits=logits.clone(),
                row_of=row_of,
                pair_logit=pair_logit,
                objectness=None if obj is None else obj[kept].to(torch.float32).clone(),
                pair_candidate=remap.to(torch.int64),
                pair_class=cls.to(torch.int64),
                nms_applied=detections.nms_applied,
                target=target,
            )
        )

    @property
    def num_pairs(self) -> int:
        """Pairs kept over all images."""
        return sum(int(i.pair_class.numel()) for i in self.images)

    def num_gt(self) -> list[int]:
        """Non-crowd ground-truth boxes per class."""
        import torch

        counts = torch.zeros(self.num_classes, dtype=torch.int64)
        for image in self.images:
            labels = image.target.labels[~image.target.crowd.to(torch.bool)]
            counts += torch.bincount(labels, minlength=self.num_classes)[: self.num_classes]
        return [int(c) for c in counts]

    def exact_up_to(self, threshold: float) -> float | None:
        """The largest T at which the T = 1 selection loses no detection (None: not known for this head)."""
        if self.head != "sigmoid" or any(i.objectness is not None for i in self.images) or self.capped:
            return None
        if threshold >= 0.5:
            return math.inf if self.floor <= 0.5 else None
        if self.floor <= 0:
            return math.inf
        if self.floor >= threshold:
            return 1.0
        return math.log(self.floor / (1 - self.floor)) / math.log(threshold / (1 - threshold))


def softmax_rows(z: torch.Tensor) -> torch.Tensor:
    """Row softmax written out (``torch.softmax`` costs milliseconds per call on small CPU tensors)."""
    e = (z - z.amax(dim=1, keepdim=True)).exp()
    return e / e.sum(dim=1, keepdim=True)


def _foreground(detections: Detections) -> torch.Tensor:
    """:func:`~calibrate_teacher.detection.base.foreground_scores`, with :func:`softmax_rows`."""
    import torch

    if detections.head != "softmax":
        return foreground_scores(detections)
    p = softmax_rows(detections.logits.to(torch.float64))
    return p[:, 1:] if detections.background == "first" else p[:, :-1]


def pair_scores(
    image: ImageCandidates, head: HeadKind, background: BackgroundLayout, temperature: float
) -> torch.Tensor:
    """Each pair's class score (float64) at ``temperature``."""
    import torch

    if head == "softmax":
        p = softmax_rows(image.logits.to(torch.float64) / temperature)
        col = image.pair_class + (1 if background == "first" else 0)
        return p[image.pair_candidate, col]
    s = torch.sigmoid(image.pair_logit.to(torch.float64) / temperature)
    if image.objectness is not None:
        s = s * torch.sigmoid(image.objectness.to(torch.float64))[image.pair_candidate]
    return s


def _plain_sigmoid(pool: CandidatePool) -> bool:
    """Sigmoid without objectness: a pair's rank (its logit) does not depend on T."""
    return pool.head == "sigmoid" and all(i.objectness is None for i in pool.images)


def _cut(image: ImageCandidates, scores: torch.Tensor, key: torch.Tensor, point: OperatingPoint) -> torch.Tensor:
    """Indices of the pairs kept at the operating point, best (highest ``key``) first."""
    import torch

    from calibrate_teacher.detection._nms import class_nms

    idx = (scores >= point.score_threshold).nonzero().squeeze(1)
    if idx.numel() and point.nms_iou is not None and not image.nms_applied:
        boxes = image.boxes[image.pair_candidate[idx]]
        kept = class_nms(boxes, key[idx], image.pair_class[idx], point.nms_iou, max_keep=point.max_detections)
        return idx[kept]
    order = torch.sort(key[idx], descending=True, stable=True).indices
    return idx[order][: point.max_detections]


def _image_records(
    pool: CandidatePool,
    i: int,
    image: ImageCandidates,
    scores: torch.Tensor,
    key: torch.Tensor,
    point: OperatingPoint,
    matching: Matching,
    offset: int,
) -> tuple[torch.Tensor, ...]:
    import torch

    keep = _cut(image, scores, key, point)
    cand = image.pair_candidate[keep]
    boxes, labels = image.boxes[cand], image.pair_class[keep]
    # matching ranks by ``key`` too (only the order of the scores matters to it)
    result = match_detections(boxes, key[keep], labels, image.target, match_iou=point.match_iou, matching=matching)
    return (
        scores[keep],
        labels,
        result.status,
        box_position_features(boxes, image.width, image.height),
        torch.full((keep.numel(),), i, dtype=torch.int64),
        boxes,
        cand + offset,
        key[keep],
    )


def _concat(parts: list[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
    import torch

    if not parts:
        empty = torch.zeros(0)
        return [
            empty.double(),
            empty.long(),
            empty.to(torch.int8),
            torch.zeros(0, 4, dtype=torch.float64),
            empty.long(),
            torch.zeros(0, 4),
            empty.long(),
            empty.double(),
        ]
    return [torch.cat([p[k] for p in parts]) for k in range(len(parts[0]))]


def _ranked(pool: CandidatePool, point: OperatingPoint, matching: Matching) -> list[torch.Tensor]:
    """Plain sigmoid pools: every image's detections for *any* T at once, cut and matched a single time.

    Pairs rank by their logit whatever T is, and a threshold keeps a prefix of that ranking; greedy
    NMS, the max-detections cut and greedy or many-to-one matching of a prefix are the prefix of
    the result on the whole list. So the list is cut (NMS without a threshold, ``max_detections``)
    and matched once; at T only ``sigmoid(z / T) >= threshold`` remains to apply.
    """
    import torch

    cache_key = (point, matching)
    if cache_key not in pool._ranked:
        open_point = OperatingPoint(
            score_threshold=-math.inf,
            max_detections=point.max_detections,
            nms_iou=point.nms_iou,
            match_iou=point.match_iou,
        )
        parts, offset = [], 0
        for i, image in enumerate(pool.images):
            key = image.pair_logit.to(torch.float64)
            parts.append(_image_records(pool, i, image, key, key, open_point, matching, offset))
            offset += image.boxes.shape[0]
        pool._ranked[cache_key] = _concat(parts)
    return pool._ranked[cache_key]


def detections_at(
    pool: CandidatePool, temperature: float, point: OperatingPoint, *, matching: Matching = "greedy"
) -> tuple[DetectionRecords, torch.Tensor]:
    """The matched detections at ``temperature``; also each one's candidate (an index over the pool's candidates)."""
    import torch

    if _plain_sigmoid(pool):
        cols = _ranked(pool, point, matching)
        scores = torch.sigmoid(cols[7] / temperature)
        keep = scores >= point.score_threshold
        return DetectionRecords(
            scores[keep], cols[1][keep], cols[2][keep], cols[3][keep], cols[4][keep], cols[5][keep]
        ), cols[6][keep]
    parts, offset = [], 0
    for i, image in enumerate(pool.images):
        scores = pair_scores(image, pool.head, pool.background, temperature)
        parts.append(_image_records(pool, i, image, scores, scores, point, matching, offset))
        offset += image.boxes.shape[0]
    cols = _concat(parts)
    return DetectionRecords(cols[0], cols[1], cols[2], cols[3], cols[4], cols[5]), cols[6]


def detections_at_reference(
    pool: CandidatePool, temperature: float, point: OperatingPoint, *, matching: Matching = "greedy"
) -> tuple[DetectionRecords, torch.Tensor]:
    """:func:`detections_at` the long way for every head: rescore, threshold, NMS, cut and match per image.

    Plain sigmoid pairs rank by logit here too, as in :func:`detections_at`.
    """
    import torch

    parts, offset = [], 0
    plain = _plain_sigmoid(pool)
    for i, image in enumerate(pool.images):
        scores = pair_scores(image, pool.head, pool.background, temperature)
        key = image.pair_logit.to(torch.float64) if plain else scores
        parts.append(_image_records(pool, i, image, scores, key, point, matching, offset))
        offset += image.boxes.shape[0]
    cols = _concat(parts)
    return DetectionRecords(cols[0], cols[1], cols[2], cols[3], cols[4], cols[5]), cols[6]


def coco_results(
    pool: CandidatePool, records: DetectionRecords, category_ids: tuple[int, ...]
) -> tuple[list[dict[str, object]], int]:
    """COCO result dicts of the detections; also how many were left out (a class without a category id)."""
    out: list[dict[str, object]] = []
    left_out = 0
    for image, label, score, box in zip(
        records.image.tolist(), records.labels.tolist(), records.scores.tolist(), records.boxes.tolist(), strict=True
    ):
        cid = category_ids[label]
        if cid < 0:
            left_out += 1
            continue
        x1, y1, x2, y2 = box
        out.append(
            {
                "image_id": pool.images[image].image_id,
                "category_id": cid,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "score": score,
            }
        )
    return out, left_out
