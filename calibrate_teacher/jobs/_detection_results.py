"""What the detection jobs return: frozen results with ``to_json()`` and rich tables."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.table import Table
    from rich.text import Text

    from calibrate_teacher.detection.bake import DetectorBake
    from calibrate_teacher.detection.cache import DetectionCacheInfo
    from calibrate_teacher.detection.fit import DetectionTemperatureFit
    from calibrate_teacher.detection.metrics import DetectionCalibration

__all__ = ["REPORT_TASK", "DetectorCalibration", "DetectorEvaluation", "DetectorSoftLabels"]

REPORT_TASK = "detection"


def _roi_json(block: Mapping[str, object] | None, skipped: str | None) -> dict[str, object]:
    out: dict[str, object] = {"roi_classification": None if block is None else dict(block)}
    if block is None:
        out["roi_classification_skipped"] = skipped
    return out


@dataclass(frozen=True)
class DetectorEvaluation:
    """The result of :func:`evaluate_detector`.

    Attributes:
        teacher: What the teacher is (path, format, head, background, classes).
        data: The data source's description.
        report: D-ECE, counts and mAP at ``report.temperature``.
        candidates: How the candidate pool was selected (floor, cap, pairs kept).
        notes: Things the user should know (defaults that stood in for something not given).
        roi_classification: Two-stage teachers: classification metrics of the RoI logits on
            sampled proposals (``proposals``, ``sampler``, ``seed``, ``metrics``); else None.
        roi_classification_skipped: Why ``roi_classification`` is None.
    """

    teacher: Mapping[str, object]
    data: Mapping[str, object]
    report: DetectionCalibration
    candidates: Mapping[str, object]
    notes: tuple[str, ...] = field(default=())
    roi_classification: Mapping[str, object] | None = None
    roi_classification_skipped: str | None = None

    def to_json(self) -> dict[str, object]:
        """The JSON report (``task: detection``, ``kind: evaluation``)."""
        from calibrate_teacher.detection.metrics import DETECTION_DEFINITIONS

        return {
            "task": REPORT_TASK,
            "kind": "evaluation",
            "teacher": dict(self.teacher),
            "data": dict(self.data),
            "head": self.teacher.get("head"),
            "background": self.teacher.get("background"),
            "operating_point": self.report.operating_point.to_json(),
            "temperature": self.report.temperature,
            "candidates": dict(self.candidates),
            "metrics": self.report.to_json(),
            "definitions": dict(DETECTION_DEFINITIONS),
            **_roi_json(self.roi_classification, self.roi_classification_skipped),
            "notes": list(self.notes),
        }

    def table(self) -> Table:
        """A rich table of the metrics."""
        from calibrate_teacher.detection.report import detection_table

        return detection_table(self.report)


@dataclass(frozen=True)
class DetectorCalibration:
    """The result of :func:`calibrate_detector`: the fit, and the teacher before and after.

    Attributes:
        teacher: What the teacher is.
        data: The data source's description.
        fit: The temperature, how it was found, and the sweep.
        before: Metrics at ``T = 1``.
        after: Metrics at the fitted T.
        candidates: How the candidate pool was selected.
        notes: Things the user should know.
        baked: The baked teacher, when the job wrote one.
        roi_classification: Two-stage teachers: RoI classification metrics on sampled
            proposals ``before`` (T = 1) and ``after`` (the fitted T); else None.
        roi_classification_skipped: Why ``roi_classification`` is None.
    """

    teacher: Mapping[str, object]
    data: Mapping[str, object]
    fit: DetectionTemperatureFit
    before: DetectionCalibration
    after: DetectionCalibration
    candidates: Mapping[str, object]
    notes: tuple[str, ...] = field(default=())
    baked: DetectorBake | None = None
    roi_classification: Mapping[str, object] | None = None
    roi_classification_skipped: str | None = None

    def to_json(self) -> dict[str, object]:
        """The JSON report (``task: detection``, ``kind: fit``)."""
        from calibrate_teacher.detection.metrics import DETECTION_DEFINITIONS
        from calibrate_teacher.temperature import paper_block

        doc: dict[str, object] = {
            "task": REPORT_TASK,
            "kind": "fit",
            "teacher": dict(self.teacher),
            "data": dict(self.data),
            "head": self.teacher.get("head"),
            "background": self.teacher.get("background"),
            "operating_point": self.before.operating_point.to_json(),
            "candidates": dict(self.candidates),
        }
        doc.update(self.fit.to_json())
        doc.update(
            {
                "verdict": self.after.verdict,
                "paper": paper_block(self.fit.temperature),
                "before": self.before.to_json(),
                "after": self.after.to_json(),
                "definitions": dict(DETECTION_DEFINITIONS),
                "baked": None if self.baked is None else self.baked.to_json(),
                **_roi_json(self.roi_classification, self.roi_classification_skipped),
                "notes": list(self.notes),
            }
        )
        return doc

    def table(self) -> Table:
        """A rich table of the metrics before and after."""
        from calibrate_teacher.detection.report import detection_table

        return detection_table(self.before, self.after)

    def sweep_table(self) -> Table:
        """A rich table of the sweep."""
        from calibrate_teacher.detection.report import detection_sweep_table

        return detection_sweep_table(self.fit)

    def summary(self) -> Text:
        """A few lines: T, how it was chosen, D-ECE and mAP before and after, the paper's range."""
        from rich.text import Text

        from calibrate_teacher.temperature import PAPER_RANGE, paper_position

        t, fit = self.fit.temperature, self.fit
        how = {"fixed": "given", "dece": "minimises D-ECE", "nll": f"minimises the {fit.head} NLL (exact)"}
        text = Text()
        text.append(f"T = {t:.4f}", style="bold")
        text.append(f" ({how.get(fit.objective, fit.objective)}; class logits only, boxes unchanged)\n")
        position = paper_position(t)

        def pct(value: float | None) -> str:
            return "n/a" if value is None else f"{100 * value:.2f}%"

        text.append(
            f"This teacher: D-ECE {self.before.dece.dece:.4f} at T = 1 -> {self.after.dece.dece:.4f} at T = {t:.4g}, "
            f"where it is {self.after.verdict}; mAP@0.5 {pct(self.before.map.map50)} -> {pct(self.after.map.map50)} "
            f"(T moves detections across the score threshold); T is {position} the paper's robust range "
            f"{PAPER_RANGE[0]:.1f}-{PAPER_RANGE[1]:.1f}."
        )
        if t < 1.0:
            text.append("\nT < 1 sharpens this teacher (it is underconfident at T = 1).", style="yellow")
        if fit.at_bound:
            text.append(f"\nT sits on a search bound {fit.bounds}: widen --bounds to search further.")
        return text


@dataclass(frozen=True)
class DetectorSoftLabels:
    """The result of :func:`export_detector_soft_labels`: the cache written, and what was read.

    Attributes:
        cache: What the export wrote (folder, images, candidate rows, T, layout, shards).
        teacher: What the teacher is.
        data: The data source's description.
        notes: Things the user should know.
    """

    cache: DetectionCacheInfo
    teacher: Mapping[str, object]
    data: Mapping[str, object]
    notes: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, object]:
        """The export as JSON (``task: detection``, ``kind: soft_labels``)."""
        return {
            "task": REPORT_TASK,
            "kind": "soft_labels",
            "cache": self.cache.to_json(),
            "teacher": dict(self.teacher),
            "data": dict(self.data),
            "notes": list(self.notes),
        }
