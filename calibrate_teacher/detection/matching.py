"""Matching detections to ground truth: which detections are true positives at a match IoU.

``greedy`` (default) is COCO's rule (pycocotools ``COCOeval.evaluateImg``, area range ``all``),
per image and class: detections in descending score order (stable), each takes the unmatched
ground-truth box of its class with the highest IoU ``>= match_iou``; non-crowd boxes are tried
before crowd regions, a crowd region may absorb any number of detections, and its IoU is
intersection over the *detection's* area. A detection matched to a crowd region is
``ignored`` (neither TP nor FP); one matched to nothing is a false positive.

``netcal`` is the many-to-one rule of netcal's detection examples (Küppers et al. 2020): a
detection is a TP when the ground-truth box (non-crowd, any class) it overlaps most has its
class and IoU ``>= match_iou``; several detections may match one box. Crowd regions are then
applied as above: a detection that is not a TP but covers a crowd region of its class by
``>= match_iou`` (intersection over its area) is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from calibrate_teacher.detection._nms import box_iou
from calibrate_teacher.errors import InvalidValueError

if TYPE_CHECKING:
    import torch

    from calibrate_teacher.detection.base import GroundTruth

__all__ = ["MATCHINGS", "MatchResult", "crowd_iou", "match_detections"]

Matching = Literal["greedy", "netcal"]
MATCHINGS: tuple[str, ...] = ("greedy", "netcal")
TP, FP, IGNORED = 1, 0, -1


@dataclass(frozen=True)
class MatchResult:
    """The outcome of each detection of one image.

    Attributes:
        status: int8 ``[N]``: 1 true positive, 0 false positive, -1 ignored (matched a crowd region).
        gt_index: int64 ``[N]``: the ground-truth box each detection matched (-1: none).
    """

    status: torch.Tensor
    gt_index: torch.Tensor


def crowd_iou(boxes: torch.Tensor, gt: torch.Tensor, crowd: torch.Tensor) -> torch.Tensor:
    """COCO's IoU ``[N, M]`` (float64): intersection over union, or over the detection's area for crowd boxes."""
    import torch

    a, b = boxes.to(torch.float64), gt.to(torch.float64)
    iou = box_iou(a, b)
    if bool(crowd.any()):
        lt = torch.maximum(a[:, None, :2], b[None, :, :2])
        rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
        wh = (rb - lt).clamp(min=0)
        area = ((a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0))[:, None]
        ioa = torch.where(area > 0, wh[..., 0] * wh[..., 1] / area.clamp(min=1e-12), torch.zeros_like(iou))
        iou = torch.where(crowd[None, :], ioa, iou)
    return iou


def match_detections(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    target: GroundTruth,
    *,
    match_iou: float = 0.5,
    matching: Matching = "greedy",
) -> MatchResult:
    """Match one image's detections to its ground truth.

    Args:
        boxes: ``[N, 4]`` xyxy detections (original pixels).
        scores: ``[N]`` their scores.
        labels: ``[N]`` their foreground classes.
        target: The image's ground truth.
        match_iou: The IoU at which a detection matches.
        matching: ``greedy`` (COCO) or ``netcal`` (many-to-one).

    Returns:
        A :class:`MatchResult` aligned with the inputs.

    Example:
        >>> import torch
        >>> from calibrate_teacher.detection.base import GroundTruth
        >>> gt = GroundTruth(torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([0]), torch.tensor([False]))
        >>> d = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 9]])
        >>> match_detections(d, torch.tensor([0.6, 0.9]), torch.tensor([0, 0]), gt).status.tolist()
        [0, 1]
    """
    import torch

    if matching not in MATCHINGS:
        raise InvalidValueError(f"matching: expected one of {', '.join(MATCHINGS)}, got {matching!r}")
    if not 0.0 < match_iou <= 1.0:
        raise InvalidValueError(f"match_iou: expected a number in (0, 1], got {match_iou}")
    n = boxes.shape[0]
    status = torch.zeros(n, dtype=torch.int8)
    gt_index = torch.full((n,), -1, dtype=torch.int64)
    if n == 0 or target.boxes.shape[0] == 0:
        return MatchResult(status, gt_index)
    crowd = target.crowd.to(torch.bool)
    iou = crowd_iou(boxes, target.boxes, crowd)
    det_labels, gt_labels = labels.tolist(), target.labels.tolist()
    if matching == "netcal":
        plain = iou.masked_fill(crowd[None, :], -1.0)
        top, arg = plain.max(dim=1)
        same = target.labels[arg] == labels
        hit = (top >= match_iou) & same & ~crowd[arg]
        status[hit] = TP
        gt_index[hit] = arg[hit]
        if bool(crowd.any()):
            covered = ((iou >= match_iou) & crowd[None, :] & (target.labels[None, :] == labels[:, None])).any(dim=1)
            status[~hit & covered] = IGNORED
        return MatchResult(status, gt_index)
    threshold = min(match_iou, 1 - 1e-10)
    order = torch.sort(scores.to(torch.float64), descending=True, stable=True).indices.tolist()
    rows = iou.tolist()
    is_crowd = crowd.tolist()
    for cls in sorted(set(det_labels)):
        # Ground truth of this class, non-crowd first (COCO sorts by its ignore flag, stably).
        gts = [g for g in range(len(gt_labels)) if gt_labels[g] == cls and not is_crowd[g]]
        gts += [g for g in range(len(gt_labels)) if gt_labels[g] == cls and is_crowd[g]]
        if not gts:
            continue
        taken = [False] * len(gt_labels)
        for d in (i for i in order if det_labels[i] == cls):
            best, m = threshold, -1
            for g in gts:
                if taken[g] and not is_crowd[g]:
                    continue
                if m > -1 and not is_crowd[m] and is_crowd[g]:
                    break
                if rows[d][g] < best:
                    continue
                best, m = rows[d][g], g
            if m == -1:
                continue
            taken[m] = True
            gt_index[d] = m
            status[d] = IGNORED if is_crowd[m] else TP
    return MatchResult(status, gt_index)
