"""Steps shared by the commands that read logits or run a teacher: progress, outputs, rendering."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from calibrate_teacher.cli._console import err, note, out, print_json, warn

if TYPE_CHECKING:
    from rich.console import RenderableType

    from calibrate_teacher.metrics import CalibrationMetrics
    from calibrate_teacher.pipeline import LogitSource


def collect_source(
    *,
    teacher: Path | None,
    logits: Path | None,
    labels: Path | None,
    data: Path | None,
    device: str,
    output: str | None,
    arch: str | None,
    arch_kwargs: str | None,
    preprocess: Path | None,
    overrides: Mapping[str, object],
    classes: Path | None,
    skip_bad: bool,
    batch_size: int,
    workers: int,
    save_logits: Path | None,
    overwrite: bool,
) -> LogitSource:
    """Call :func:`calibrate_teacher.pipeline.obtain_logits` with a progress bar; print its notes."""
    from calibrate_teacher.cli._progress import progress_bar
    from calibrate_teacher.pipeline import obtain_logits

    with progress_bar("teacher", unit="samples") as advance:
        source = obtain_logits(
            logits=logits, labels=labels, teacher=teacher, data=data, device=device, output=output,
            arch=arch, arch_kwargs=arch_kwargs, preprocess=preprocess, preprocess_overrides=overrides or None,
            classes=classes, skip_bad=skip_bad, batch_size=batch_size, workers=workers,
            save_logits=save_logits, overwrite=overwrite, progress=advance,
        )
    for line in source.notes:
        note(line)
    if source.skipped:
        warn(f"skipped {len(source.skipped)} unreadable sample(s); they are listed in the report")
    return source


def precheck_outputs(*paths: Path | None, overwrite: bool, diagram: Path | None = None) -> None:
    """Refuse existing outputs, or a diagram without matplotlib, up front, before any long run."""
    from calibrate_teacher._io import check_output
    from calibrate_teacher.report import require_matplotlib

    if diagram is not None:
        require_matplotlib()
    for path in (*paths, diagram):
        if path is not None:
            check_output(path, overwrite=overwrite)


def write_outputs(
    document: dict[str, object],
    *,
    report: Path | None,
    diagram: Path | None,
    before: CalibrationMetrics,
    after: CalibrationMetrics | None,
    overwrite: bool,
) -> None:
    """Write the JSON report and the reliability diagram where asked (atomically)."""
    from calibrate_teacher.report import save_reliability_diagram, write_json

    if report is not None:
        write_json(document, report, overwrite=overwrite)
        note(f"report written to {report}")
    if diagram is not None:
        save_reliability_diagram(diagram, before, after, overwrite=overwrite)
        note(f"reliability diagram written to {diagram}")


def render_or_json(document: dict[str, object], as_json: bool, renderables: Sequence[RenderableType]) -> None:
    """Print one JSON document, or the renderables, on stdout."""
    if as_json:
        print_json(document)
        return
    for item in renderables:
        out.print(item)
    err.file.flush()
