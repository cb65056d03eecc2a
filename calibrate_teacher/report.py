"""Reports: JSON documents, rich renderables and reliability diagrams. Nothing here prints.

The JSON documents are versioned (``format_version``); ``tests/golden/`` pins their shape.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from calibrate_teacher._io import atomic_output
from calibrate_teacher.errors import MissingDependencyError
from calibrate_teacher.metrics import DEFINITIONS, CalibrationMetrics

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.table import Table

    from calibrate_teacher.temperature import SweepPoint, TemperatureFit

__all__ = [
    "REPORT_FORMAT_VERSION",
    "evaluation_document",
    "fit_document",
    "fit_summary",
    "metrics_table",
    "reliability_text",
    "require_matplotlib",
    "save_reliability_diagram",
    "sweep_table",
    "write_json",
]

REPORT_FORMAT_VERSION = 1
_ROWS = (
    ("accuracy", "accuracy", True),
    ("confidence", "mean confidence", True),
    ("nll", "NLL", False),
    ("brier", "Brier", False),
    ("ece", "ECE", False),
    ("ece_over", "  over-confident part", False),
    ("ece_under", "  under-confident part", False),
    ("mce", "MCE", False),
    ("adaece", "AdaECE", False),
    ("ace", "ACE", False),
    ("tace", "TACE", False),
    ("classwise_ece", "classwise ECE", False),
)


def _tool_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("calibrate-teacher")
    except PackageNotFoundError:
        return "unknown"


def evaluation_document(metrics: CalibrationMetrics, *, source: dict[str, object]) -> dict[str, object]:
    """The JSON report of ``evaluate``: ``metrics``, ``source``, ``definitions``."""
    return {
        "format_version": REPORT_FORMAT_VERSION,
        "tool": {"name": "calibrate-teacher", "version": _tool_version()},
        "kind": "evaluation",
        "source": source,
        "metrics": metrics.to_dict(),
        "definitions": dict(DEFINITIONS),
    }


def fit_document(fit: TemperatureFit, *, source: dict[str, object]) -> dict[str, object]:
    """The JSON report of ``fit``: ``temperature``, ``objective``, ``before``, ``after``, ``sweep``..."""
    doc: dict[str, object] = {
        "format_version": REPORT_FORMAT_VERSION,
        "tool": {"name": "calibrate-teacher", "version": _tool_version()},
        "kind": "fit",
        "source": source,
    }
    doc.update(fit.to_dict())
    return doc


def write_json(document: dict[str, object], path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write a JSON document atomically (temp name, then rename)."""
    with atomic_output(path, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return Path(path)


def _fmt(value: float, percent: bool) -> str:
    return f"{100 * value:.2f}%" if percent else f"{value:.4f}"


def metrics_table(before: CalibrationMetrics, after: CalibrationMetrics | None = None) -> Table:
    """A table of every metric; with ``after``, before/after columns and the change."""
    from rich.table import Table

    table = Table(title="Calibration" if after is None else "Before and after temperature scaling")
    table.add_column("metric")
    if after is None:
        t = before.temperature
        table.add_column(f"T = {t:g}" if t is not None else "value", justify="right")
        if before.confidence_intervals:
            table.add_column("95% CI", justify="right")
    else:
        table.add_column(f"before (T = {before.temperature or 1:g})", justify="right")
        table.add_column(f"after (T = {after.temperature or 1:.4g})", justify="right")
        table.add_column("change", justify="right")
    for key, label, percent in _ROWS:
        b = float(getattr(before, key))
        row = [label, _fmt(b, percent)]
        if after is None:
            if before.confidence_intervals:
                ci = before.confidence_intervals.get(key)
                row.append(f"[{_fmt(ci[0], percent)}, {_fmt(ci[1], percent)}]" if ci else "")
        else:
            a = float(getattr(after, key))
            row += [_fmt(a, percent), f"{a - b:+.4f}" if not percent else f"{100 * (a - b):+.2f} pt"]
        table.add_row(*row)
    return table


def sweep_table(points: tuple[SweepPoint, ...], chosen: float, *, max_rows: int = 12) -> Table:
    """A table of the sweep, thinned to about ``max_rows`` rows; T = 1, 1.5 and the chosen T kept."""
    from rich.table import Table

    keep = {0, len(points) - 1}
    keep |= {round(i * (len(points) - 1) / (max_rows - 1)) for i in range(max_rows)}
    keep |= {i for i, p in enumerate(points) if p.temperature in (1.0, 1.5)}
    table = Table(title=f"Sweep over {len(points)} temperatures (shown: {min(len(keep), len(points))})")
    for col in ("T", "NLL", "ECE", "over", "under", "AdaECE", "confidence"):
        table.add_column(col, justify="right")
    for i, p in enumerate(points):
        if i not in keep:
            continue
        table.add_row(
            f"{p.temperature:.4g}", f"{p.nll:.4f}", f"{p.ece:.4f}", f"{p.ece_over:.4f}",
            f"{p.ece_under:.4f}", f"{p.adaece:.4f}", f"{p.confidence:.4f}",
        )
    table.caption = f"chosen T = {chosen:.4g}"
    return table


def fit_summary(fit: TemperatureFit) -> RenderableType:
    """A few lines: T, how it was chosen, the verdict and the paper's range."""
    from rich.text import Text

    lines = Text()
    how = {"fixed": "given", "paper": "minimises ECE within the paper's 1.5-3.0"}.get(
        fit.objective, f"minimises {fit.objective.upper()}"
    )
    lines.append(f"T = {fit.temperature:.4f}", style="bold")
    lines.append(f" ({how}; {fit.passes} passes over the logits)\n")
    lines.append(
        f"ECE {fit.before.ece:.4f} -> {fit.after.ece:.4f}; the teacher ends {fit.verdict} "
        f"(over {fit.after.ece_over:.4f}, under {fit.after.ece_under:.4f}).\n"
    )
    lo, hi = 1.5, 3.0
    position = {"below": "below", "within": "inside", "above": "above"}[fit.paper_range]
    lines.append(
        f"T is {position} the paper's robust range {lo}-{hi} (Kim et al. use T = 1.5, which leaves "
        "the teacher slightly underconfident)."
    )
    if fit.temperature < 1.0:
        lines.append(
            "\nT < 1 sharpens this underconfident teacher. For distillation, consider the paper's "
            "policy instead (--objective paper, or --temperature 1.5): in docs/evidence.md, sharpened "
            "teachers made worse students for 3 of 7 underconfident teachers, while T = 1.5 hurt none.",
            style="yellow",
        )
    if fit.at_bound:
        lines.append(f"\nT sits on a search bound {fit.bounds}: widen --bounds to search further.")
    return lines


def reliability_text(metrics: CalibrationMetrics, *, width: int = 30) -> Table:
    """A terminal reliability diagram: per bin, accuracy and confidence as bars."""
    from rich.table import Table

    table = Table(title=f"Reliability (T = {metrics.temperature or 1:g})", show_edge=False)
    table.add_column("confidence bin")
    table.add_column("n", justify="right")
    table.add_column("accuracy vs confidence")
    table.add_column("gap", justify="right")
    for b in metrics.bins:
        if b.count == 0:
            continue
        acc = round(b.accuracy * width)
        conf = round(b.confidence * width)
        bar = "".join(
            "█" if i < min(acc, conf) else ("▒" if i < acc else ("░" if i < conf else " "))
            for i in range(width)
        )
        style = "red" if b.gap > 0 else "green"
        table.add_row(f"({b.lower:.2f}, {b.upper:.2f}]", str(b.count), bar, f"[{style}]{b.gap:+.3f}[/]")
    table.caption = "█ accuracy and confidence, ▒ accuracy only, ░ confidence only (overconfident)"
    return table


def require_matplotlib() -> None:
    """Raise a one-line install hint unless matplotlib can be imported.

    Raises:
        MissingDependencyError: matplotlib is not installed.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            "the reliability diagram needs matplotlib: pip install 'calibrate-teacher[plot]'"
        ) from exc


def save_reliability_diagram(
    path: str | os.PathLike[str],
    before: CalibrationMetrics,
    after: CalibrationMetrics | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Save a reliability diagram (PNG, or any format matplotlib knows by suffix).

    Raises:
        MissingDependencyError: matplotlib is not installed.
        OutputExistsError: ``path`` exists and ``overwrite`` is false.
    """
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [before] if after is None else [before, after]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, m in zip(axes[0], panels, strict=True):
        width = 1.0 / m.n_bins
        centers = [b.lower + width / 2 for b in m.bins]
        ax.bar(centers, [b.accuracy for b in m.bins], width=width, edgecolor="black",
               color="#4c72b0", label="accuracy")
        ax.bar(centers, [b.confidence - b.accuracy for b in m.bins], bottom=[b.accuracy for b in m.bins],
               width=width, color="#dd8452", alpha=0.5, edgecolor="#dd8452", label="gap")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(f"T = {m.temperature or 1:.3g}: ECE {m.ece:.4f}, acc {m.accuracy:.3f}")
        ax.legend(loc="upper left")
    fig.tight_layout()
    suffix = Path(path).suffix.lstrip(".") or "png"
    try:
        with atomic_output(path, overwrite=overwrite) as tmp:
            fig.savefig(tmp, format=suffix, dpi=120)
    finally:
        plt.close(fig)
    return Path(path)
