"""Reports: JSON documents, rich renderables and reliability diagrams. Nothing here prints.

The JSON documents are versioned (``format_version``); ``tests/golden/`` pins their shape.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from calibrate_teacher._io import atomic_output
from calibrate_teacher._version import tool_version
from calibrate_teacher.errors import MissingDependencyError
from calibrate_teacher.metrics import DEFINITIONS, CalibrationMetrics

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.table import Table

    from calibrate_teacher.jobs import CalibrationRun, Evaluation
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

REPORT_FORMAT_VERSION = 2
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


def evaluation_document(evaluation: Evaluation) -> dict[str, object]:
    """The JSON report of ``evaluate``: ``source``, ``temperature``, ``metrics``, ``definitions``."""
    return {
        "format_version": REPORT_FORMAT_VERSION,
        "tool": {"name": "calibrate-teacher", "version": tool_version()},
        "kind": "evaluation",
        "source": evaluation.source.description,
        "notes": list(evaluation.source.notes),
        "temperature": evaluation.temperature,
        "metrics": evaluation.metrics.to_json(),
        "definitions": dict(DEFINITIONS),
    }


def fit_document(run: CalibrationRun) -> dict[str, object]:
    """The JSON report of ``fit``: ``temperature``, ``objective``, ``before``, ``after``, ``sweep``...

    ``baked`` is there when a baked teacher was written.
    """
    doc: dict[str, object] = {
        "format_version": REPORT_FORMAT_VERSION,
        "tool": {"name": "calibrate-teacher", "version": tool_version()},
        "kind": "fit",
        "source": run.source.description,
        "notes": list(run.notes),
    }
    doc.update(run.fit.to_json())
    if run.baked is not None:
        doc["baked"] = run.baked.to_json()
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


_PAPER_POSITION = {"below": "below", "within": "inside", "above": "above"}


def fit_summary(fit: TemperatureFit) -> RenderableType:
    """A few lines: T, how it was chosen, this teacher's numbers, and what the paper found.

    The paper's finding is stated as the paper's (on its teachers and data), next to this
    teacher's numbers; nothing here predicts how a student of this teacher will do.
    """
    from rich.text import Text

    from calibrate_teacher.temperature import PAPER_DEFAULT_T, PAPER_RANGE

    lines = Text()
    how = {"fixed": "given", "paper": "minimises ECE within the paper's 1.5-3.0"}.get(
        fit.objective, f"minimises {fit.objective.upper()}"
    )
    lines.append(f"T = {fit.temperature:.4f}", style="bold")
    lines.append(f" ({how}; {fit.passes} passes over the logits)\n")
    lines.append(
        f"This teacher: ECE {fit.before.ece:.4f} at T = 1 -> {fit.after.ece:.4f} at T = "
        f"{fit.temperature:.4g}, where it is {fit.verdict} (over {fit.after.ece_over:.4f}, "
        f"under {fit.after.ece_under:.4f}); T is {_PAPER_POSITION[fit.paper_range]} the paper's "
        f"robust range {PAPER_RANGE[0]:.1f}-{PAPER_RANGE[1]:.1f}.\n"
    )
    # What the paper reported, as its finding: it is evidence about its teachers, not a
    # prediction for this one (docs/evidence.md tests it in miniature).
    lines.append(
        "The paper (Kim et al., arXiv 2508.20224) found on CIFAR-100 that teachers with lower "
        f"ECE distilled into more accurate students; its default is T = {PAPER_DEFAULT_T:g}. "
        "Whether this teacher's students gain is not measured here "
        "(docs/evidence.md tests the claim in miniature).",
        style="dim",
    )
    if fit.temperature < 1.0:
        lines.append(
            "\nT < 1 sharpens this teacher (it is underconfident at T = 1). For distillation, "
            "consider the paper's policy instead (--objective paper, or --temperature 1.5): in the "
            "miniature experiment of docs/evidence.md, sharpening made worse students for 3 of 7 "
            "underconfident teachers (better for 1), while T = 1.5 hurt none.",
            style="yellow",
        )
    if fit.at_bound:
        lines.append(f"\nT sits on a search bound {fit.bounds}: widen --bounds to search further.")
    return lines


#: Terminal styles of the two sides of a gap (the diagram's colours are in _DIAGRAM_COLOURS).
_OVER_STYLE, _UNDER_STYLE = "red", "green"
#: Bins holding less than this share of the samples are dimmed: their gap says little.
_SMALL_BIN_SHARE = 0.01


def reliability_text(metrics: CalibrationMetrics, *, width: int = 30) -> Table:
    """A terminal reliability diagram: per non-empty bin, its count, share, bars and gap.

    Each row shows the bin's sample count and share of all samples, accuracy and mean confidence
    as one bar (``█`` where both reach, red ``░`` where confidence exceeds accuracy: the
    over-confident gap, green ``▒`` where accuracy exceeds confidence: the under-confident gap),
    and the gap ``confidence - accuracy``. Rows of bins under 1% of the samples are dimmed; the
    title gives ECE and its over- and under-confident parts, the caption explains every mark.

    Args:
        metrics: The metrics whose bins are drawn.
        width: Characters in a full (1.0) bar.

    Returns:
        A rich table (render it with a console).
    """
    from rich.table import Table
    from rich.text import Text

    total = sum(b.count for b in metrics.bins) or 1
    table = Table(
        title=(
            f"Reliability (T = {metrics.temperature or 1:.4g}): ECE {metrics.ece:.4f} = "
            f"over {metrics.ece_over:.4f} + under {metrics.ece_under:.4f}"
        ),
        show_edge=False,
        caption_justify="left",
    )
    table.add_column("confidence bin")
    table.add_column("n", justify="right")
    table.add_column("share", justify="right")
    table.add_column("accuracy vs confidence")
    table.add_column("gap", justify="right")
    for b in metrics.bins:
        if b.count == 0:
            continue
        acc = round(b.accuracy * width)
        conf = round(b.confidence * width)
        both = min(acc, conf)
        bar = Text.assemble(
            "█" * both,
            ("▒" * (acc - both), _UNDER_STYLE),
            ("░" * (conf - both), _OVER_STYLE),
            " " * (width - max(acc, conf)),
        )
        side = _OVER_STYLE if b.gap > 0 else _UNDER_STYLE if b.gap < 0 else ""
        share = b.count / total
        table.add_row(
            f"({b.lower:.2f}, {b.upper:.2f}]",
            f"{b.count:,}",
            f"{100 * share:.1f}%",
            bar,
            Text(f"{b.gap:+.3f}", style=side),
            style="dim" if share < _SMALL_BIN_SHARE else None,
        )
    table.caption = Text.assemble(
        "█ accuracy and confidence; ",
        ("░", _OVER_STYLE),
        " confidence above accuracy: over-confident;\n",
        ("▒", _UNDER_STYLE),
        " accuracy above confidence: under-confident; gap = confidence - accuracy.\n",
        f"n: samples in the bin; share: n / {total:,}; dim rows: share under {_SMALL_BIN_SHARE:.0%}.",
    )
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


if TYPE_CHECKING:  # the diagram's types (kept beside it: matplotlib is an optional extra)
    from matplotlib.artist import Artist
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: Diagram colours (Okabe-Ito hues, so the two gap sides differ for colour-blind readers too;
#: they also differ in hatch direction). Tints are opaque, so no colour appears that the legend lacks.
_DIAGRAM_COLOURS = {
    "accuracy": "#4c72b0",
    "over": "#d55e00",
    "under": "#009e73",
    "count": "#9a9a9a",
}
_HATCH = {"over": "////", "under": "\\\\\\\\"}
#: Per-bin counts are written above the histogram bars up to this many bins (beyond, they crowd).
_MAX_LABELLED_BINS = 25


def _tint(colour: str, amount: float = 0.35) -> tuple[float, float, float]:
    """``colour`` mixed with white (``amount`` of the colour): an opaque light fill."""
    from matplotlib.colors import to_rgb

    return tuple(1 - amount * (1 - c) for c in to_rgb(colour))  # type: ignore[return-value]


def _count_label(count: int) -> str:
    return f"{count:,}" if count < 10_000 else f"{count / 1000:.0f}k"


def _draw_reliability(top: Axes, bottom: Axes, m: CalibrationMetrics, heading: str) -> None:
    """One column: accuracy bars, confidence ticks and gaps on ``top``; the histogram on ``bottom``."""
    filled = [b for b in m.bins if b.count > 0]
    total = sum(b.count for b in filled) or 1
    lefts = [b.lower for b in filled]
    widths = [b.upper - b.lower for b in filled]
    acc = [b.accuracy for b in filled]
    conf = [b.confidence for b in filled]
    top.bar(lefts, acc, widths, align="edge", color=_DIAGRAM_COLOURS["accuracy"], zorder=2)
    for side, picked in (("over", [b.gap > 0 for b in filled]), ("under", [b.gap < 0 for b in filled])):
        rows = [i for i, keep in enumerate(picked) if keep]
        if not rows:
            continue
        # over: from accuracy up to confidence, above the bar; under: from confidence up to
        # accuracy, inside the bar (drawn opaque over it, so the bar's top is still accuracy)
        top.bar(
            [lefts[i] for i in rows],
            [abs(acc[i] - conf[i]) for i in rows],
            [widths[i] for i in rows],
            bottom=[min(acc[i], conf[i]) for i in rows],
            align="edge",
            facecolor=_tint(_DIAGRAM_COLOURS[side]),
            edgecolor=_DIAGRAM_COLOURS[side],
            hatch=_HATCH[side],
            linewidth=0.8,
            zorder=3,
        )
    top.bar(lefts, acc, widths, align="edge", fill=False, edgecolor="black", linewidth=0.7, zorder=4)
    top.hlines(conf, lefts, [lo + w for lo, w in zip(lefts, widths, strict=True)],
               colors="black", linewidth=2.0, zorder=5)
    top.plot([0, 1], [0, 1], linestyle="--", color="0.35", linewidth=1, zorder=6)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.grid(True, color="0.9", linewidth=0.6, zorder=0)
    top.set_axisbelow(True)
    t = m.temperature or 1
    top.set_title(
        f"{heading}T = {t:.4g}, accuracy {100 * m.accuracy:.2f}%\n"
        f"ECE {m.ece:.4f} = over {m.ece_over:.4f} + under {m.ece_under:.4f}",
        fontsize=10,
    )
    shares = [b.count / total for b in filled]
    bottom.bar(lefts, shares, widths, align="edge", color=_DIAGRAM_COLOURS["count"],
               edgecolor="black", linewidth=0.6, zorder=2)
    if m.n_bins <= _MAX_LABELLED_BINS:
        for b, lo, w, share in zip(filled, lefts, widths, shares, strict=True):
            bottom.text(lo + w / 2, share + 0.03, _count_label(b.count), ha="center",
                        va="bottom", fontsize=7, zorder=3)
    bottom.set_ylim(0, 1.25)
    bottom.set_yticks([0, 0.5, 1])
    bottom.set_yticklabels(["0", "50%", "100%"])
    bottom.set_ylabel("share of\nsamples")
    bottom.set_xlabel("confidence (top-label probability)")
    bottom.grid(True, axis="y", color="0.9", linewidth=0.6, zorder=0)
    bottom.set_axisbelow(True)


def _legend_handles(*, counts_written: bool) -> list[Artist]:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    c = _DIAGRAM_COLOURS
    return [
        Patch(facecolor=c["accuracy"], edgecolor="black", linewidth=0.7, label="accuracy in the bin"),
        Line2D([], [], color="black", linewidth=2.0, label="mean confidence in the bin"),
        Patch(facecolor=_tint(c["over"]), edgecolor=c["over"], hatch=_HATCH["over"],
              label="over-confident gap (confidence > accuracy)"),
        Patch(facecolor=_tint(c["under"]), edgecolor=c["under"], hatch=_HATCH["under"],
              label="under-confident gap (accuracy > confidence)"),
        Line2D([], [], color="0.35", linestyle="--", linewidth=1, label="perfect calibration"),
        Patch(facecolor=c["count"], edgecolor="black", linewidth=0.6,
              label="share of samples in the bin" + (" (count above)" if counts_written else "")),
    ]


def save_reliability_diagram(
    path: str | os.PathLike[str],
    before: CalibrationMetrics,
    after: CalibrationMetrics | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Save a reliability diagram (PNG, or any format matplotlib knows by suffix).

    One column per set of metrics, ``before`` and (where given) ``after`` side by side on the
    same axes, each in the style of Guo et al. (2017): on top, per non-empty confidence bin,
    the accuracy as a bar, the mean confidence as a black tick, and the gap between them
    hatched in one colour where the teacher is over-confident (confidence above accuracy) and
    another where it is under-confident; below, a histogram of the share of samples per bin
    with each bin's count, so a bin of two samples does not look as weighty as one of a
    thousand. Titles give T, accuracy, and ECE split into its over- and under-confident parts;
    one legend names every colour. Drawn on a bare ``Figure`` (no pyplot, no backend switch).

    Args:
        path: The file to write; its suffix picks the format (``.png``, ``.svg``, ``.pdf``...).
        before: The metrics to draw (at T = 1, for a fit).
        after: The metrics after temperature scaling, drawn beside ``before``.
        overwrite: Replace ``path`` where it exists.

    Returns:
        ``path``.

    Raises:
        MissingDependencyError: matplotlib is not installed.
        OutputExistsError: ``path`` exists and ``overwrite`` is false.
    """
    require_matplotlib()
    fig = _reliability_figure(before, after)
    suffix = Path(path).suffix.lstrip(".") or "png"
    with atomic_output(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, format=suffix, dpi=120)
    return Path(path)


def _reliability_figure(before: CalibrationMetrics, after: CalibrationMetrics | None) -> Figure:
    """The diagram :func:`save_reliability_diagram` saves (matplotlib must be importable)."""
    from matplotlib.figure import Figure

    panels = [("", before)] if after is None else [("before: ", before), ("after: ", after)]
    fig = Figure(figsize=(7.0 if after is None else 10.0, 6.4), layout="constrained")
    grid = fig.add_gridspec(2, len(panels), height_ratios=(3, 1))
    first_top = None
    for col, (heading, m) in enumerate(panels):
        top = fig.add_subplot(grid[0, col], sharey=first_top)
        bottom = fig.add_subplot(grid[1, col], sharex=top)
        first_top = first_top or top
        top.tick_params(labelbottom=False)
        _draw_reliability(top, bottom, m, heading)
    fig.suptitle(
        f"Reliability: {before.n_bins} equal-width bins (lo, hi], N = {before.num_samples:,}",
        fontsize=11,
    )
    handles = _legend_handles(counts_written=before.n_bins <= _MAX_LABELLED_BINS)
    fig.legend(handles=handles, loc="outside lower center", ncols=2 if after is None else 3,
               frameon=False, fontsize=8)
    return fig
