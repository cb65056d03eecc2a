"""The reliability diagram, its terminal table and the fit summary (issue #10, item 7)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.colors import to_hex
from PIL import Image
from rich.console import Console

from calibrate_teacher.errors import OutputExistsError
from calibrate_teacher.metrics import calibration_metrics
from calibrate_teacher.report import (
    _DIAGRAM_COLOURS,
    _reliability_figure,
    fit_summary,
    reliability_text,
    save_reliability_diagram,
)
from calibrate_teacher.temperature import fit_temperature


def _mixed_teacher(n=1200, classes=5):
    """Logits of a teacher overconfident when sure and underconfident when unsure, plus a few outliers."""
    rng = np.random.default_rng(0)
    pred = rng.integers(0, classes, n)
    sure = rng.random(n) < 0.7
    scale = np.where(sure, 5.0, 0.9)
    logits = rng.normal(0, 0.3, (n, classes)) + scale[:, None] * np.eye(classes)[pred]
    right = rng.random(n) < np.where(sure, 0.8, 0.85)  # sure: ~0.98 confident, 80% right
    labels = np.where(right, pred, (pred + 1 + rng.integers(0, classes - 1, n)) % classes)
    return torch.from_numpy(logits), torch.from_numpy(labels)


@pytest.fixture(scope="module")
def fit():
    logits, labels = _mixed_teacher()
    return fit_temperature(logits, labels, objective="ece")


@pytest.fixture(scope="module")
def figure(fit):
    return _reliability_figure(fit.before, fit.after)


def _bars(ax):
    return [p for p in ax.patches if p.get_height() > 0]


def test_both_gap_sides_are_drawn_in_their_own_colours(fit, figure):
    before = figure.axes[0]
    edges = {to_hex(p.get_edgecolor()) for p in _bars(before)}
    assert {_DIAGRAM_COLOURS["over"], _DIAGRAM_COLOURS["under"]} <= edges
    assert fit.before.ece_over > 0 and fit.before.ece_under > 0  # the case has both sides


def test_every_colour_drawn_has_a_legend_entry(figure):
    (legend,) = figure.legends
    handles = legend.legend_handles
    faces = {to_hex(h.get_facecolor()) for h in handles if hasattr(h, "get_hatch")}
    lines = {to_hex(h.get_color()) for h in handles if hasattr(h, "get_linestyle") and not hasattr(h, "get_hatch")}
    hatches = {h.get_hatch() for h in handles if hasattr(h, "get_hatch")}
    for ax in figure.axes:
        for patch in _bars(ax):
            if patch.get_fill():
                assert to_hex(patch.get_facecolor()) in faces, patch
                assert patch.get_hatch() in hatches
        for line in ax.lines:
            assert to_hex(line.get_color()) in lines
        for collection in ax.collections:  # the mean-confidence ticks
            assert {to_hex(c) for c in collection.get_colors()} <= lines
    labels = [t.get_text() for t in legend.get_texts()]
    assert "over-confident gap (confidence > accuracy)" in labels
    assert "under-confident gap (accuracy > confidence)" in labels
    assert {"accuracy in the bin", "mean confidence in the bin", "perfect calibration"} <= set(labels)
    assert "share of samples in the bin (count above)" in labels


def test_histogram_gives_every_bins_count_and_titles_give_ece_parts(fit, figure):
    top_before, hist_before, top_after, hist_after = figure.axes
    for top, hist, m, heading in ((top_before, hist_before, fit.before, "before"),
                                  (top_after, hist_after, fit.after, "after")):
        filled = [b for b in m.bins if b.count > 0]
        assert [t.get_text() for t in hist.texts] == [f"{b.count:,}" for b in filled]
        shares = sorted(p.get_height() for p in _bars(hist))
        assert shares == pytest.approx(sorted(b.count / m.num_samples for b in filled))
        title = top.get_title()
        assert title.startswith(heading) and f"T = {m.temperature or 1:.4g}" in title
        assert f"ECE {m.ece:.4f} = over {m.ece_over:.4f} + under {m.ece_under:.4f}" in title
    assert f"N = {fit.before.num_samples:,}" in figure.get_suptitle()


def test_png_shows_both_gap_colours(tmp_path, fit):
    png = save_reliability_diagram(tmp_path / "rel.png", fit.before, fit.after)
    pixels = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16).reshape(-1, 3)
    for side in ("over", "under", "accuracy", "count"):
        target = np.array([int(_DIAGRAM_COLOURS[side][i : i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(pixels - target).max(axis=1) <= 8).sum() > 50, side
    with pytest.raises(OutputExistsError):
        save_reliability_diagram(png, fit.before, fit.after)


def test_single_panel_svg_and_many_bins(tmp_path, fit):
    logits, labels = _mixed_teacher()
    many = calibration_metrics(logits, labels, n_bins=50)
    svg = save_reliability_diagram(tmp_path / "rel.svg", many)
    assert b"<svg" in svg.read_bytes()[:2000]
    figure = _reliability_figure(many, None)
    assert len(figure.axes) == 2 and len(figure.axes[1].texts) == 0  # 50 counts would crowd: not written
    assert "share of samples in the bin" in [t.get_text() for t in figure.legends[0].get_texts()]


def _render(renderable, width=120):
    console = Console(record=True, width=width, color_system=None)
    console.print(renderable)
    return console.export_text()


def test_reliability_text_shows_counts_shares_and_both_sides(fit):
    m = fit.before
    table = reliability_text(m)
    text = _render(table)
    assert f"ECE {m.ece:.4f} = over {m.ece_over:.4f} + under {m.ece_under:.4f}" in text
    assert "over-confident" in text and "under-confident" in text and "share" in text
    filled = [b for b in m.bins if b.count > 0]
    counts = [str(c) for c in table.columns[1].cells]
    assert counts == [f"{b.count:,}" for b in filled]
    gaps = list(table.columns[4].cells)
    for b, cell in zip(filled, gaps, strict=True):
        assert cell.style == ("red" if b.gap > 0 else "green" if b.gap < 0 else "")
    assert {"red", "green"} <= {c.style for c in gaps}
    for b, row in zip(filled, table.rows, strict=True):
        assert (row.style == "dim") == (b.count / m.num_samples < 0.01)


def test_fit_summary_states_the_paper_finding_and_this_teachers_numbers(fit):
    text = " ".join(_render(fit_summary(fit), width=400).split())
    assert f"ECE {fit.before.ece:.4f} at T = 1 -> {fit.after.ece:.4f}" in text
    assert f"where it is {fit.verdict}" in text
    assert "The paper (Kim et al., arXiv 2508.20224) found" in text
    assert "not measured here" in text
    # no verdict on this teacher from the paper, and no promise about its students
    assert "leaves the teacher" not in text and "will improve" not in text
