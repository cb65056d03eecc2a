"""RoI classification of a two-stage teacher on sampled proposals: the rows logit KD distils.

In logit-based two-stage detection KD (DKD on Faster R-CNN) the teacher's box head classifies
the RoIs the RoI head is trained on: proposals labelled by IoU with the ground truth and
subsampled. :func:`sample_proposals` draws such RoIs without an RPN, seeded per image:

- candidates: every non-crowd ground-truth box (torchvision's ``add_gt_proposals``),
  ``jitter_per_box`` jittered copies of each (centre moved by ``shift * (w, h) * U(-1, 1)``,
  width and height scaled by ``exp(scale * U(-1, 1))``) and ``random_boxes`` uniform boxes
  (two sorted uniform coordinates per axis), all clipped to the image; boxes under 1 pixel wide
  or high are dropped;
- labels (torchvision's ``Matcher`` with ``fg_iou_thresh = bg_iou_thresh = 0.5``): the class of
  the ground-truth box of highest IoU when that IoU is ``>= 0.5``, else background; crowd
  regions are excluded from the ground truth (as detectron2 drops ``iscrowd`` instances before
  training), so a box on one is background;
- class indices follow the teacher's layout: background ``first`` -> 0 and class ``c`` ->
  ``c + 1`` (torchvision); ``last`` -> ``C`` and ``c`` -> ``c`` (detectron2);
- subsampling (torchvision's ``BalancedPositiveNegativeSampler``): at most
  ``int(batch_size_per_image * positive_fraction)`` foreground boxes, chosen at random, then
  background boxes up to ``batch_size_per_image`` in all (defaults 512 and 0.25).

:func:`roi_classification` maps each image's sample to model-input pixels (the inverse of
:func:`~calibrate_teacher.detection.base.to_original`), asks the teacher for the RoI head's
logits of those boxes (:class:`RoiTeacher`) and returns the classification metrics
(:func:`~calibrate_teacher.metrics.calibration_metrics`) of ``softmax(z / T)`` against the labels.
The rows are held in memory: ``[proposals, C + 1]`` float32, at most ``batch_size_per_image``
(512) rows per image.

**Contract for PyTorch detectors.** A detector module may define
``classify_proposals(images [B, 3, H, W], proposals: list of [N_i, 4] xyxy input pixels) ->
list of [N_i, C + 1]``: its RoI head's class logits (the rows of
``roi_heads.box_predictor.cls_score``) for the given boxes, pooled from ``images``' features as
its own forward pools its proposals. The loaded teacher's ``roi_logits`` calls it; without it
(or for ONNX and dense teachers) the metrics are skipped, with the reason
(:func:`roi_unavailable`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from calibrate_teacher.detection.base import BackgroundLayout, GroundTruth, ImageTransform
from calibrate_teacher.errors import InputError, InvalidValueError

if TYPE_CHECKING:
    import torch

    from calibrate_teacher.detection.coco import CocoSource
    from calibrate_teacher.metrics import CalibrationMetrics

__all__ = [
    "ProposalSample",
    "ProposalSampler",
    "RoiTeacher",
    "collect_roi_rows",
    "label_proposals",
    "roi_classification",
    "roi_report",
    "roi_unavailable",
    "sample_proposals",
    "to_input",
]


@runtime_checkable
class RoiTeacher(Protocol):
    """A two-stage detection teacher that can classify given boxes with its RoI head."""

    num_classes: int
    background: BackgroundLayout

    def roi_logits(self, images: torch.Tensor, proposals: list[torch.Tensor]) -> list[torch.Tensor]:
        """The RoI head's class logits ``[N_i, C + 1]`` of each image's boxes (xyxy input pixels)."""
        ...


@dataclass(frozen=True)
class ProposalSampler:
    """How proposals are drawn and labelled (defaults: torchvision's RoI head training).

    Attributes:
        batch_size_per_image: At most this many proposals per image (torchvision: 512).
        positive_fraction: At most this fraction of them foreground (torchvision: 0.25).
        fg_iou: IoU with a ground-truth box at which a proposal takes its class (0.5).
        jitter_per_box: Jittered copies of each ground-truth box.
        shift: Centre shift, as a fraction of the box's width / height (uniform in ``±shift``).
        scale: Log-scale noise of width and height (uniform in ``±scale``).
        random_boxes: Uniform random boxes per image.
    """

    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    fg_iou: float = 0.5
    jitter_per_box: int = 32
    shift: float = 0.25
    scale: float = 0.4
    random_boxes: int = 256

    def __post_init__(self) -> None:
        for name, least in (("batch_size_per_image", 1), ("jitter_per_box", 0), ("random_boxes", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise InvalidValueError(f"{name}: expected an integer >= {least}, got {value!r}")
        if not 0.0 <= self.positive_fraction <= 1.0:
            raise InvalidValueError(f"positive_fraction: expected a value in [0, 1], got {self.positive_fraction}")
        if not 0.0 < self.fg_iou <= 1.0:
            raise InvalidValueError(f"fg_iou: expected a value in (0, 1], got {self.fg_iou}")
        if self.shift < 0 or self.scale < 0:
            raise InvalidValueError(f"shift / scale: expected values >= 0, got {self.shift}, {self.scale}")

    def to_json(self) -> dict[str, object]:
        """The sampler's settings as JSON."""
        return {
            "batch_size_per_image": self.batch_size_per_image,
            "positive_fraction": self.positive_fraction,
            "fg_iou": self.fg_iou,
            "bg_iou": self.fg_iou,
            "jitter_per_box": self.jitter_per_box,
            "shift": self.shift,
            "scale": self.scale,
            "random_boxes": self.random_boxes,
            "crowd": "excluded from the ground truth",
        }


@dataclass(frozen=True)
class ProposalSample:
    """One image's sampled proposals.

    Attributes:
        boxes: float32 ``[N, 4]`` xyxy in original-image pixels.
        labels: int64 ``[N]`` RoI-head targets in the teacher's layout (background included).
        iou: float64 ``[N]`` the best IoU with a non-crowd ground-truth box (0 when there is none).
    """

    boxes: torch.Tensor
    labels: torch.Tensor
    iou: torch.Tensor


def _generator(seed: int, image_id: int) -> torch.Generator:
    import torch

    # One stream per (seed, image): the sample does not depend on batch size or image order.
    return torch.Generator().manual_seed((seed * 1_000_003 + image_id) % (2**63))


def sample_proposals(
    target: GroundTruth,
    *,
    width: int,
    height: int,
    num_classes: int,
    background: BackgroundLayout,
    seed: int = 0,
    image_id: int = 0,
    sampler: ProposalSampler | None = None,
) -> ProposalSample:
    """Draw and label one image's proposals as a Faster R-CNN RoI head's training targets.

    Args:
        target: The image's ground truth (original pixels; crowd regions are excluded).
        width: Original image width (boxes are clipped to it).
        height: Original image height.
        num_classes: Foreground classes C.
        background: ``first`` (background 0, class c -> c + 1) or ``last`` (background C).
        seed: Seed of the draw (with ``image_id``: the same image always gets the same sample).
        image_id: The image's id.
        sampler: Counts and noise (default :class:`ProposalSampler`).

    Returns:
        A :class:`ProposalSample`, foreground rows first, each part in random order.

    Raises:
        InvalidValueError: ``background`` is ``none`` (a sigmoid head has no RoI targets).
    """
    import torch

    if background not in ("first", "last"):
        raise InvalidValueError(f"background: RoI targets need 'first' or 'last', got {background!r}")
    cfg = sampler or ProposalSampler()
    g = _generator(seed, image_id)
    gt = target.boxes.to(torch.float64)[~target.crowd.to(torch.bool)].reshape(-1, 4)
    parts = [gt]
    if len(gt) and cfg.jitter_per_box:
        wh = (gt[:, 2:] - gt[:, :2]).repeat_interleave(cfg.jitter_per_box, dim=0)
        centre = ((gt[:, :2] + gt[:, 2:]) / 2).repeat_interleave(cfg.jitter_per_box, dim=0)
        u = torch.rand(len(wh), 4, generator=g, dtype=torch.float64) * 2 - 1
        centre = centre + u[:, :2] * cfg.shift * wh
        wh = wh * torch.exp(u[:, 2:] * cfg.scale)
        parts.append(torch.cat([centre - wh / 2, centre + wh / 2], dim=1))
    if cfg.random_boxes:
        r = torch.rand(cfg.random_boxes, 2, 2, generator=g, dtype=torch.float64)
        r = r * torch.tensor([float(width), float(height)], dtype=torch.float64)
        lo, hi = r.min(dim=1).values, r.max(dim=1).values
        parts.append(torch.cat([lo, hi], dim=1))
    boxes = torch.cat(parts)
    limit = torch.tensor([width, height] * 2, dtype=torch.float64)
    boxes = torch.minimum(boxes.clamp(min=0), limit)
    boxes = boxes[((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)]
    labels, best = label_proposals(boxes, target, num_classes=num_classes, background=background, fg_iou=cfg.fg_iou)
    bg_index = 0 if background == "first" else num_classes
    fg = labels != bg_index
    # torchvision's BalancedPositiveNegativeSampler: random fg up to the cap, then bg to fill.
    pos, neg = torch.nonzero(fg).flatten(), torch.nonzero(~fg).flatten()
    n_pos = min(len(pos), int(cfg.batch_size_per_image * cfg.positive_fraction))
    n_neg = min(len(neg), cfg.batch_size_per_image - n_pos)
    pos = pos[torch.randperm(len(pos), generator=g)[:n_pos]]
    neg = neg[torch.randperm(len(neg), generator=g)[:n_neg]]
    chosen = torch.cat([pos, neg])
    return ProposalSample(boxes=boxes[chosen].float(), labels=labels[chosen], iou=best[chosen])


def label_proposals(
    boxes: torch.Tensor,
    target: GroundTruth,
    *,
    num_classes: int,
    background: BackgroundLayout,
    fg_iou: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Label boxes as RoI-head targets: the best-IoU non-crowd box's class if IoU >= ``fg_iou``, else background.

    Args:
        boxes: ``[N, 4]`` xyxy, in the ground truth's pixels.
        target: The ground truth (crowd regions are left out).
        num_classes: Foreground classes C.
        background: ``first`` (background 0, class c -> c + 1) or ``last`` (background C, c -> c).
        fg_iou: The foreground IoU (torchvision: 0.5 for both thresholds, so nothing is ignored).

    Returns:
        ``(labels [N] int64, best IoU [N] float64)``.

    Example:
        >>> import torch
        >>> gt = GroundTruth(torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([2]), torch.tensor([False]))
        >>> boxes = torch.tensor([[0.0, 0, 10, 5], [0.0, 0, 10, 4]])  # IoU 0.5 and 0.4
        >>> label_proposals(boxes, gt, num_classes=3, background="first")[0].tolist()
        [3, 0]
    """
    import torch

    from calibrate_teacher.detection._nms import box_iou

    if background not in ("first", "last"):
        raise InvalidValueError(f"background: RoI targets need 'first' or 'last', got {background!r}")
    keep = ~target.crowd.to(torch.bool)
    gt = target.boxes.to(torch.float64)[keep].reshape(-1, 4)
    gt_labels = target.labels.to(torch.int64)[keep]
    bg_index = 0 if background == "first" else num_classes
    labels = torch.full((len(boxes),), bg_index, dtype=torch.int64)
    if not len(gt) or not len(boxes):
        return labels, torch.zeros(len(boxes), dtype=torch.float64)
    best, which = box_iou(boxes.to(torch.float64), gt).max(dim=1)
    fg = best >= fg_iou
    labels[fg] = gt_labels[which[fg]] + (1 if background == "first" else 0)
    return labels, best


def to_input(boxes: torch.Tensor, transform: ImageTransform) -> torch.Tensor:
    """Map boxes from original-image pixels to model-input pixels (``x_in = x_orig * scale + pad``)."""
    import torch

    scale = torch.tensor([transform.scale_x, transform.scale_y] * 2, dtype=boxes.dtype)
    pad = torch.tensor([transform.pad_x, transform.pad_y] * 2, dtype=boxes.dtype)
    return boxes * scale + pad


def roi_unavailable(teacher: object) -> str | None:
    """Why the teacher's RoI head cannot classify proposals (None: it can)."""
    if getattr(teacher, "head", None) != "softmax":
        return "a dense (sigmoid) head has no RoI head to classify proposals; RoI metrics are for two-stage teachers"
    if not isinstance(teacher, RoiTeacher):
        fmt = getattr(teacher, "format", type(teacher).__name__)
        return (
            f"a {fmt} teacher cannot run its RoI head on given proposals "
            "(a PyTorch detector with classify_proposals can)"
        )
    model = getattr(teacher, "model", None)
    if model is not None and not callable(getattr(model, "classify_proposals", None)):
        return (
            f"the detector module {type(model).__name__} has no classify_proposals(images, proposals); "
            "define it to get RoI classification metrics (docs/detection.md)"
        )
    return None


def collect_roi_rows(
    teacher: RoiTeacher,
    source: CocoSource,
    *,
    seed: int = 0,
    batch_size: int = 8,
    sampler: ProposalSampler | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample every image's proposals and collect the RoI head's logits for them.

    Returns:
        ``(logits [R, C + 1] float32, labels [R] int64)`` over all images, in source order.

    Raises:
        InputError: no image could be read, or the teacher's rows have the wrong shape.
    """
    import torch

    logits: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    width = teacher.num_classes + 1
    for batch in source.batches(batch_size=batch_size):
        samples = [
            sample_proposals(
                gt, width=t.width, height=t.height, num_classes=teacher.num_classes,
                background=teacher.background, seed=seed, image_id=i, sampler=sampler,
            )
            for gt, t, i in zip(batch.targets, batch.transforms, batch.image_ids, strict=True)
        ]  # fmt: skip
        boxes = [to_input(s.boxes, t) for s, t in zip(samples, batch.transforms, strict=True)]
        rows = teacher.roi_logits(batch.images, boxes)
        for s, z in zip(samples, rows, strict=True):
            if tuple(z.shape) != (len(s.labels), width):
                raise InputError(
                    f"roi_logits returned {list(z.shape)} for {len(s.labels)} proposals; expected "
                    f"[{len(s.labels)}, {width}] (C + 1 class logits per box)"
                )
            logits.append(z.detach().float().cpu())
            labels.append(s.labels)
    if not logits:
        raise InputError(f"{source.path}: no image could be read for the RoI classification metrics")
    return torch.cat(logits), torch.cat(labels)


def roi_classification(
    teacher: object,
    source: CocoSource,
    *,
    temperature: float = 1.0,
    n_bins: int = 15,
    seed: int = 0,
    batch_size: int = 8,
    sampler: ProposalSampler | None = None,
) -> CalibrationMetrics | None:
    """Classification metrics of a two-stage teacher's RoI logits on sampled, labelled proposals.

    Args:
        teacher: A loaded detection teacher.
        source: The COCO source (ground truth and transforms per image).
        temperature: Divide the RoI logits by this before the softmax.
        n_bins: Bins of every binned metric.
        seed: Seed of the proposal draw.
        batch_size: Images per teacher call.
        sampler: Counts and noise (default :class:`ProposalSampler`: torchvision's 512 / 0.25).

    Returns:
        :func:`~calibrate_teacher.metrics.calibration_metrics` of ``softmax(z / T)`` over all
        sampled proposals, or None when :func:`roi_unavailable` gives a reason.
    """
    from calibrate_teacher.metrics import calibration_metrics

    if roi_unavailable(teacher) is not None or not isinstance(teacher, RoiTeacher):
        return None
    logits, labels = collect_roi_rows(teacher, source, seed=seed, batch_size=batch_size, sampler=sampler)
    return calibration_metrics(logits, labels, temperature=temperature, n_bins=n_bins)


def roi_report(
    teacher: object,
    source: CocoSource,
    temperatures: dict[str, float],
    *,
    n_bins: int = 15,
    seed: int = 0,
    batch_size: int = 8,
    sampler: ProposalSampler | None = None,
) -> tuple[dict[str, object] | None, str | None]:
    """The jobs' ``roi_classification`` block: metrics at each named temperature, or why not.

    One pass over the images collects the rows; each temperature is then one metrics call.

    Returns:
        ``(block, None)``: ``{"proposals", "sampler", "seed", <name>: metrics JSON...}``; or
        ``(None, reason)`` when :func:`roi_unavailable` gives one.
    """
    from calibrate_teacher.metrics import calibration_metrics

    reason = roi_unavailable(teacher)
    if reason is not None or not isinstance(teacher, RoiTeacher):
        return None, reason
    cfg = sampler or ProposalSampler()
    logits, labels = collect_roi_rows(teacher, source, seed=seed, batch_size=batch_size, sampler=cfg)
    block: dict[str, object] = {
        "proposals": len(labels),
        "foreground": int((labels != (0 if teacher.background == "first" else teacher.num_classes)).sum()),
        "sampler": cfg.to_json(),
        "seed": seed,
    }
    for name, t in temperatures.items():
        block[name] = calibration_metrics(logits, labels, temperature=t, n_bins=n_bins).to_json()
    return block, None
