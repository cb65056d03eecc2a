"""Rich tables of detection reports (nothing here prints; the CLI renders them)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.table import Table

    from calibrate_teacher.detection.fit import DetectionTemperatureFit
    from calibrate_teacher.detection.metrics import DetectionCalibration

__all__ = ["detection_rows", "detection_sweep_table", "detection_table"]


_ROWS = (
    ("dece", "D-ECE", "f"),
    ("dece_over", "  over-confident part", "f"),
    ("dece_under", "  under-confident part", "f"),
    ("dece_position", "D-ECE with box position", "f"),
    ("confidence", "mean confidence", "%"),
    ("precision", "precision", "%"),
    ("recall", "recall", "%"),
    ("map50", "mAP@0.5", "%"),
    ("map", "mAP@[.5:.95]", "%"),
    ("num_detections", "detections", "d"),
    ("num_tp", "  true positives", "d"),
    ("num_fp", "  false positives", "d"),
    ("num_ignored", "  ignored (crowd)", "d"),
    ("num_gt", "ground-truth boxes", "d"),
)


def _fmt(value: float | int | None, kind: str) -> str:
    if value is None:
        return "n/a"
    if kind == "%":
        return f"{100 * value:.2f}%"
    if kind == "d":
        return str(int(value))
    return f"{value:.4f}"


def detection_rows(before: DetectionCalibration, after: DetectionCalibration | None = None) -> list[tuple[str, ...]]:
    """The table's rows as plain strings: (metric, value) or (metric, before, after)."""
    docs = [r.to_json() for r in (before, after) if r is not None]
    rows = []
    for key, label, kind in _ROWS:
        values = [d[key] for d in docs]
        rows.append((label, *(_fmt(v if isinstance(v, int | float) else None, kind) for v in values)))
    return rows


def detection_table(before: DetectionCalibration, after: DetectionCalibration | None = None) -> Table:
    """D-ECE, counts and mAP (with ``after``: before and after); the caption states the operating point."""
    from rich.table import Table

    table = Table(title="Detection calibration" if after is None else "Before and after temperature scaling")
    table.add_column("metric")
    if after is None:
        table.add_column(f"T = {before.temperature:g}", justify="right")
    else:
        table.add_column(f"before (T = {before.temperature:g})", justify="right")
        table.add_column(f"after (T = {after.temperature:.4g})", justify="right")
    for row in detection_rows(before, after):
        table.add_row(*row)
    p = before.operating_point
    nms = "model's own / none" if p.nms_iou is None else f"{p.nms_iou:g}"
    table.caption = (
        f"score >= {p.score_threshold:g}, <= {p.max_detections} per image, NMS IoU {nms}, "
        f"match IoU {p.match_iou:g} ({before.matching})"
    )
    if before.map.reason:
        table.caption += f"; mAP: {before.map.reason}"
    return table


def detection_sweep_table(fit: DetectionTemperatureFit, *, max_rows: int = 12) -> Table:
    """The sweep, thinned to about ``max_rows`` rows (T = 1 and 1.5 kept)."""
    from rich.table import Table

    points = fit.sweep
    keep = {0, len(points) - 1}
    keep |= {round(i * (len(points) - 1) / max(max_rows - 1, 1)) for i in range(max_rows)}
    keep |= {i for i, p in enumerate(points) if p.temperature in (1.0, 1.5)}
    table = Table(title=f"Sweep over {len(points)} temperatures")
    for col in ("T", "D-ECE", "over", "under", "detections", "TP", "FP", "confidence"):
        table.add_column(col, justify="right")
    for i, p in enumerate(points):
        if i in keep:
            table.add_row(
                f"{p.temperature:.4g}",
                f"{p.dece:.4f}",
                f"{p.dece_over:.4f}",
                f"{p.dece_under:.4f}",
                str(p.num_detections),
                str(p.num_tp),
                str(p.num_fp),
                f"{p.confidence:.4f}",
            )
    table.caption = f"chosen T = {fit.temperature:.4g} ({fit.objective})"
    return table
