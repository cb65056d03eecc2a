"""Detection calibration metrics: D-ECE (confidence-only and with box position), per class, and COCO mAP.

D-ECE (Küppers et al. 2020, netcal ``ECE(detection=True)``): the detections kept at the
operating point are matched to the ground truth (:mod:`~calibrate_teacher.detection.matching`;
ignored detections are left out); each has a confidence ``s`` (its class score) and an outcome
``m`` (1 for a true positive). The features ``(s, x_1..x_k)`` are binned jointly on equal-width
bins over ``[0, 1]`` per feature, bins ``[lo, hi)`` with 1 in the last (numpy ``histogramdd``,
as netcal); with ``N_b`` detections in bin ``b``, ``prec(b)`` their mean outcome and
``conf(b)`` their mean confidence::

    D-ECE       = sum_b N_b / N * |prec(b) - conf(b)|
    D-ECE_over  = sum_b N_b / N * max(conf(b) - prec(b), 0)     (so D-ECE = over + under)
    D-ECE_under = sum_b N_b / N * max(prec(b) - conf(b), 0)

Confidence-only D-ECE bins ``s`` alone (default 20 bins, as netcal's detection evaluation);
position D-ECE adds the box's ``cx, cy, w, h`` divided by the image width / height (clipped to
``[0, 1]``), 5 bins per feature (netcal's example for 5 features). Bins holding fewer than
``min_bin_count`` detections add no deviation but keep their weight (netcal's
``sample_threshold``; default 1: every bin counts). Per-class D-ECE is confidence-only D-ECE
over one class's detections.

mAP is pycocotools' ``COCOeval`` (``iouType="bbox"``) on in-memory dicts: AP@0.5 and
AP@[.5:.95] at ``maxDets`` = the operating point's ``max_detections``. Without pycocotools (the
``detection`` extra) the mAP keys are None with the reason; nothing stands in for it.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from calibrate_teacher.errors import InvalidValueError, MissingDependencyError

if TYPE_CHECKING:
    import torch

    from calibrate_teacher.detection.base import OperatingPoint

__all__ = [
    "DETECTION_DEFINITIONS",
    "DetectionCalibration",
    "DetectionECE",
    "DetectionRecords",
    "MeanAveragePrecision",
    "box_position_features",
    "coco_map",
    "detection_calibration",
    "detection_calibration_error",
]

DETECTION_DEFINITIONS = {
    "dece": "D-ECE (Küppers et al. 2020; netcal ECE(detection=True)): sum_b N_b/N |precision_b - confidence_b| over "
    "equal-width confidence bins [lo, hi) (1 in the last) of the matched detections (ignored ones left out)",
    "dece_position": "D-ECE with confidence, cx, cy, w, h (box centre and size / image size) binned jointly",
    "dece_over": "sum_b N_b/N max(confidence_b - precision_b, 0); dece_under likewise, dece = over + under",
    "matching": "greedy: COCO's one-to-one rule in score order (crowd matches ignored); "
    "netcal: many-to-one, TP when the most-overlapping ground truth has the detection's class",
    "map": "pycocotools COCOeval bbox AP@[.5:.95] (map) and AP@0.5 (map50), maxDets = max_detections",
}


@dataclass(frozen=True)
class DetectionRecords:
    """The detections kept at an operating point, with their outcomes (ignored ones included).

    Attributes:
        scores: float64 ``[n]`` class scores.
        labels: int64 ``[n]`` foreground classes.
        status: int8 ``[n]``: 1 TP, 0 FP, -1 ignored.
        features: float64 ``[n, 4]`` normalised ``cx, cy, w, h``.
        image: int64 ``[n]`` the image (position in the run) of each detection.
        boxes: float32 ``[n, 4]`` xyxy in original pixels.
    """

    scores: torch.Tensor
    labels: torch.Tensor
    status: torch.Tensor
    features: torch.Tensor
    image: torch.Tensor
    boxes: torch.Tensor


@dataclass(frozen=True)
class DetectionECE:
    """D-ECE and its over/under-confident parts.

    Attributes:
        dece: The D-ECE (0 when there are no detections).
        over: The over-confident part.
        under: The under-confident part.
        count: Detections binned.
        bins: Bins per feature (confidence first).
    """

    dece: float
    over: float
    under: float
    count: int
    bins: tuple[int, ...]

    def to_json(self) -> dict[str, object]:
        """The values as a JSON object."""
        return {"dece": self.dece, "over": self.over, "under": self.under, "count": self.count, "bins": list(self.bins)}


def box_position_features(
    boxes: torch.Tensor, width: torch.Tensor | float, height: torch.Tensor | float
) -> torch.Tensor:
    """``cx, cy, w, h`` of xyxy ``boxes`` divided by the image ``width`` / ``height``, clipped to [0, 1] (float64).

    Example:
        >>> import torch
        >>> box_position_features(torch.tensor([[0.0, 0, 50, 20]]), 100.0, 40.0).tolist()
        [[0.25, 0.25, 0.5, 0.5]]
    """
    import torch

    b = boxes.to(torch.float64)
    w = torch.as_tensor(width, dtype=torch.float64)
    h = torch.as_tensor(height, dtype=torch.float64)
    out = torch.stack(
        [(b[:, 0] + b[:, 2]) / 2 / w, (b[:, 1] + b[:, 3]) / 2 / h, (b[:, 2] - b[:, 0]) / w, (b[:, 3] - b[:, 1]) / h],
        dim=1,
    )
    return out.clamp(0.0, 1.0)


def detection_calibration_error(
    confidence: torch.Tensor,
    matched: torch.Tensor,
    *,
    features: torch.Tensor | None = None,
    n_bins: int | Sequence[int] = 20,
    min_bin_count: int = 1,
) -> DetectionECE:
    """D-ECE of detections (see the module docstring for the definition).

    Args:
        confidence: ``[n]`` scores in [0, 1].
        matched: ``[n]`` 0/1 outcomes (1: true positive).
        features: Optional ``[n, k]`` extra features in [0, 1] binned jointly with the confidence.
        n_bins: Bins per feature: one number for all, or one per feature (confidence first).
        min_bin_count: Bins with fewer detections add no deviation (netcal's ``sample_threshold``).

    Returns:
        A :class:`DetectionECE`.

    Raises:
        InvalidValueError: mismatched shapes, values outside [0, 1], bad ``n_bins``.

    Example:
        >>> import torch
        >>> e = detection_calibration_error(torch.tensor([0.9, 0.9, 0.2, 0.3]), torch.tensor([1, 0, 0, 1]), n_bins=2)
        >>> round(e.dece, 4), round(e.over, 4), round(e.under, 4)
        (0.325, 0.2, 0.125)
    """
    import torch

    conf = confidence.detach().to("cpu", torch.float64).reshape(-1)
    hits = matched.detach().to("cpu", torch.float64).reshape(-1)
    if hits.shape != conf.shape:
        raise InvalidValueError(f"matched: expected {conf.numel()} outcomes, got {hits.numel()}")
    columns = [conf]
    if features is not None:
        f = features.detach().to("cpu", torch.float64)
        if f.ndim != 2 or f.shape[0] != conf.numel():
            raise InvalidValueError(f"features: expected [{conf.numel()}, k], got {list(f.shape)}")
        columns += list(f.unbind(dim=1))
    bins = (n_bins,) * len(columns) if isinstance(n_bins, int) else tuple(int(b) for b in n_bins)
    if len(bins) != len(columns) or any(isinstance(b, bool) or b < 1 for b in bins):
        raise InvalidValueError(f"n_bins: expected a positive integer or {len(columns)} of them, got {n_bins!r}")
    values = torch.stack(columns, dim=1)
    if values.numel() and not bool(((values >= 0) & (values <= 1)).all()):
        raise InvalidValueError("confidence/features: every value must lie in [0, 1] (NaN is refused)")
    n = conf.numel()
    if n == 0:
        return DetectionECE(0.0, 0.0, 0.0, 0, bins)
    flat = torch.zeros(n, dtype=torch.int64)
    for k, m in enumerate(bins):
        # numpy's linspace edges (netcal's), i * (1 / m): torch.linspace rounds some edges differently
        inner = torch.arange(1, m, dtype=torch.float64) * (1.0 / m)
        flat = flat * m + torch.bucketize(values[:, k].contiguous(), inner, right=True)
    total = 1
    for m in bins:
        total *= m
    count = torch.bincount(flat, minlength=total).to(torch.float64)
    conf_sum = torch.zeros(total, dtype=torch.float64).index_add_(0, flat, conf)
    hit_sum = torch.zeros(total, dtype=torch.float64).index_add_(0, flat, hits)
    used = count >= max(min_bin_count, 1)
    gap = torch.where(used, (conf_sum - hit_sum) / count.clamp(min=1), torch.zeros_like(count))
    weight = count / n
    over = float((weight * gap.clamp(min=0)).sum())
    under = float((weight * (-gap).clamp(min=0)).sum())
    return DetectionECE(over + under, over, under, n, bins)


@dataclass(frozen=True)
class MeanAveragePrecision:
    """COCO mAP, or why it is missing.

    Attributes:
        map: AP@[.5:.95] (None: not computed).
        map50: AP@0.5.
        reason: Why the values are None ("" when they are there).
    """

    map: float | None
    map50: float | None
    reason: str = ""


def coco_map(
    ground_truth: dict[str, object], results: list[dict[str, object]], *, max_detections: int = 100
) -> MeanAveragePrecision:
    """AP@[.5:.95] and AP@0.5 by pycocotools' ``COCOeval`` on in-memory dicts.

    Args:
        ground_truth: A COCO ground-truth dict (images, annotations, categories).
        results: COCO results: ``image_id``, ``category_id``, ``bbox`` (xywh), ``score``.
        max_detections: ``maxDets`` of the evaluation (the last of ``[1, 10, max_detections]``).

    Returns:
        A :class:`MeanAveragePrecision`; its values are None with a reason where there is no
        ground truth to score.

    Raises:
        MissingDependencyError: pycocotools is not installed.
    """
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as exc:
        raise MissingDependencyError("mAP needs pycocotools: pip install 'calibrate-teacher[detection]'") from exc
    annotations = ground_truth.get("annotations")
    if not isinstance(annotations, list) or not any(not a.get("iscrowd") for a in annotations):
        return MeanAveragePrecision(None, None, "no ground-truth boxes to score")
    if not results:
        return MeanAveragePrecision(0.0, 0.0)
    # pycocotools prints its progress; the library never prints, so it goes nowhere.
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = ground_truth
        gt.createIndex()
        dt = gt.loadRes(results)
        evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.params.maxDets = [1, 10, max_detections]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    ap, ap50 = float(evaluator.stats[0]), float(evaluator.stats[1])
    if ap < 0 or ap50 < 0:
        return MeanAveragePrecision(None, None, "no category with ground truth")
    return MeanAveragePrecision(ap, ap50)


@dataclass(frozen=True)
class DetectionCalibration:
    """A detection teacher's calibration and accuracy at one temperature and operating point.

    Attributes:
        temperature: The T the logits were divided by.
        operating_point: Where detections were cut.
        matching: ``greedy`` or ``netcal``.
        num_images: Images evaluated.
        num_gt: Non-crowd ground-truth boxes.
        num_detections: Detections kept (TP + FP + ignored).
        num_tp: True positives.
        num_fp: False positives.
        num_ignored: Detections matched to crowd regions.
        confidence: Mean confidence of the scored (non-ignored) detections.
        precision: TP / (TP + FP).
        recall: TP / num_gt.
        dece: Confidence-only D-ECE.
        dece_position: D-ECE with box position features.
        per_class: ``(class name, D-ECE, non-crowd ground-truth boxes)`` per class.
        map: The COCO mAP at this temperature.
    """

    temperature: float
    operating_point: OperatingPoint
    matching: str
    num_images: int
    num_gt: int
    num_detections: int
    num_tp: int
    num_fp: int
    num_ignored: int
    confidence: float
    precision: float
    recall: float
    dece: DetectionECE
    dece_position: DetectionECE
    per_class: tuple[tuple[str, DetectionECE, int], ...]
    map: MeanAveragePrecision

    @property
    def verdict(self) -> str:
        """``overconfident`` when the over-confident part of D-ECE dominates, else ``underconfident``."""
        return "overconfident" if self.dece.over >= self.dece.under else "underconfident"

    def to_json(self) -> dict[str, object]:
        """The report as JSON."""
        return {
            "temperature": self.temperature,
            "operating_point": self.operating_point.to_json(),
            "matching": self.matching,
            "num_images": self.num_images,
            "num_gt": self.num_gt,
            "num_detections": self.num_detections,
            "num_tp": self.num_tp,
            "num_fp": self.num_fp,
            "num_ignored": self.num_ignored,
            "confidence": self.confidence,
            "precision": self.precision,
            "recall": self.recall,
            "dece": self.dece.dece,
            "dece_over": self.dece.over,
            "dece_under": self.dece.under,
            "dece_position": self.dece_position.dece,
            "dece_position_over": self.dece_position.over,
            "dece_position_under": self.dece_position.under,
            "bins": list(self.dece.bins),
            "position_bins": list(self.dece_position.bins),
            "verdict": self.verdict,
            "per_class": {name: {**e.to_json(), "num_gt": n} for name, e, n in self.per_class},
            "map": self.map.map,
            "map50": self.map.map50,
            "map_note": self.map.reason or None,
        }


def detection_calibration(
    records: DetectionRecords,
    *,
    num_gt: Sequence[int],
    class_names: Sequence[str],
    temperature: float,
    operating_point: OperatingPoint,
    matching: str,
    num_images: int,
    mean_ap: MeanAveragePrecision,
    n_bins: int = 20,
    position_bins: int = 5,
    min_bin_count: int = 1,
) -> DetectionCalibration:
    """The full report from matched detections (ignored detections counted, not scored).

    Args:
        records: The detections with their outcomes.
        num_gt: Non-crowd ground-truth boxes per class.
        class_names: Names of the classes, in model order.
        temperature: The T of the scores.
        operating_point: The operating point used.
        matching: The matching rule used.
        num_images: Images evaluated.
        mean_ap: The mAP at this temperature.
        n_bins: Confidence bins of D-ECE.
        position_bins: Bins per feature of position D-ECE.
        min_bin_count: See :func:`detection_calibration_error`.

    Returns:
        A :class:`DetectionCalibration`.
    """
    import torch

    scored = records.status >= 0
    conf, hits = records.scores[scored], (records.status[scored] == 1).to(torch.float64)
    labels = records.labels[scored]
    dece = detection_calibration_error(conf, hits, n_bins=n_bins, min_bin_count=min_bin_count)
    position = detection_calibration_error(
        conf, hits, features=records.features[scored], n_bins=position_bins, min_bin_count=min_bin_count
    )
    per_class = []
    for c, name in enumerate(class_names):
        mine = labels == c
        e = detection_calibration_error(conf[mine], hits[mine], n_bins=n_bins, min_bin_count=min_bin_count)
        per_class.append((str(name), e, int(num_gt[c])))
    tp = int((records.status == 1).sum())
    fp = int((records.status == 0).sum())
    total_gt = int(sum(num_gt))
    return DetectionCalibration(
        temperature=float(temperature),
        operating_point=operating_point,
        matching=matching,
        num_images=num_images,
        num_gt=total_gt,
        num_detections=int(records.status.numel()),
        num_tp=tp,
        num_fp=fp,
        num_ignored=int((records.status < 0).sum()),
        confidence=float(conf.mean()) if conf.numel() else 0.0,
        precision=tp / (tp + fp) if tp + fp else 0.0,
        recall=tp / total_gt if total_gt else 0.0,
        dece=dece,
        dece_position=position,
        per_class=tuple(per_class),
        map=mean_ap,
    )
