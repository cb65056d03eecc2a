"""Steps shared by the commands that read logits or run a teacher: progress, outputs, rendering."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from calibrate_teacher.cli._console import err, note, out, print_json, warn

if TYPE_CHECKING:
    from rich.console import RenderableType

    from calibrate_teacher.jobs import LogitSource
    from calibrate_teacher.metrics import CalibrationMetrics


@contextlib.contextmanager
def teacher_progress(runs_teacher: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar for the teacher run (none when only logits are read)."""
    if not runs_teacher:
        yield None
        return
    from calibrate_teacher.cli._progress import progress_bar

    with progress_bar("teacher", unit="samples") as advance:
        yield advance


def print_notes(source: LogitSource) -> None:
    """Print what loading the teacher and data had to say, and the skipped samples, on stderr."""
    for line in source.notes:
        note(line)
    data = source.description.get("data")
    if isinstance(data, dict) and data.get("preprocess_from") and data.get("kind") != "text":
        note(f"preprocessing: {data['preprocess_from']}")
        for line in data.get("preprocess_warnings") or ():
            warn(str(line))
    if source.skipped:
        warn(
            f"skipped {len(source.skipped)} unreadable sample(s) or folder entries; they are listed "
            "in the report"
        )


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
