"""The token-level side of ``evaluate``, ``fit`` and ``export-soft-labels`` (causal LMs, token classifiers).

Each handler calls one job of :mod:`calibrate_teacher.jobs._tokens` /
:mod:`calibrate_teacher.jobs._export_tokens` and renders what it returns; the commands call
these when :func:`~calibrate_teacher.jobs._route.task_of` says ``tokens``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from calibrate_teacher.cli._common import render_or_json
from calibrate_teacher.cli._console import note

if TYPE_CHECKING:
    from calibrate_teacher.soft_labels import Calibration
    from calibrate_teacher.specs import DataSpec, TeacherSpec


@contextlib.contextmanager
def token_progress() -> Iterator[Callable[[int, int | None], None]]:
    """A bar counting scored tokens; the jobs report the running total, the bar wants steps."""
    from calibrate_teacher.cli._progress import progress_bar

    with progress_bar("teacher", unit="tokens") as advance:
        seen = [0]

        def update(done: int, total: int | None) -> None:
            advance(done - seen[0], total or 0)
            seen[0] = done

        yield update


def _print_notes(notes: Sequence[str]) -> None:
    for line in notes:
        note(line)


def _write_report(document: dict[str, object], report: Path | None, *, overwrite: bool) -> None:
    from calibrate_teacher.report import write_json

    if report is not None:
        write_json(document, report, overwrite=overwrite)
        note(f"report written to {report}")


def evaluate(
    teacher_spec: TeacherSpec, data_spec: DataSpec, *, temperature: float, n_bins: int, json_output: bool,
    report: Path | None, overwrite: bool,
) -> None:
    """``evaluate`` for a token-level teacher."""
    from calibrate_teacher.jobs._tokens import evaluate_tokens

    with token_progress() as advance:
        run = evaluate_tokens(teacher_spec, data_spec, temperature=temperature, n_bins=n_bins, progress=advance)
    _print_notes(run.notes)
    document = run.to_json()
    _write_report(document, report, overwrite=overwrite)
    render_or_json(document, json_output, [run.table()])


def fit(
    teacher_spec: TeacherSpec, data_spec: DataSpec, *, objective: str, temperature: float | None,
    bounds: tuple[float, float], grid: int, n_bins: int, out: Path | None, bake: bool, json_output: bool,
    report: Path | None, overwrite: bool,
) -> None:
    """``fit`` for a token-level teacher: T over scored tokens, then the baked directory."""
    from calibrate_teacher.jobs._tokens import calibrate_tokens

    with token_progress() as advance:
        run = calibrate_tokens(
            teacher_spec, data_spec, objective=objective,  # type: ignore[arg-type]
            temperature=temperature, bounds=bounds, grid=grid, n_bins=n_bins, out=out, bake=bake,
            overwrite=overwrite, progress=advance,
        )
    _print_notes(run.notes)
    document = run.to_json()
    _write_report(document, report, overwrite=overwrite)
    if run.baked is not None:
        _print_notes([line for line in run.baked.notes if line not in run.notes])  # not the loading twice
        note(f"baked teacher written to {run.baked.path} (outputs = logits / {run.temperature:.4f})")
    render_or_json(document, json_output, [run.table()])


def export(
    teacher_spec: TeacherSpec, data_spec: DataSpec, out_dir: Path, *, calibration: Calibration, top_k: int | None,
    shard_rows: int | None, overwrite: bool, resume: bool, json_output: bool,
) -> None:
    """``export-soft-labels`` for a token-level teacher: one cache row per scored token."""
    from calibrate_teacher.cli._console import out, print_json
    from calibrate_teacher.cli._progress import progress_bar
    from calibrate_teacher.cli.inspect_cache import cache_table
    from calibrate_teacher.jobs import export_token_soft_labels
    from calibrate_teacher.soft_labels import describe_cache
    from calibrate_teacher.soft_labels.token_writer import DEFAULT_TOKEN_SHARD_ROWS

    with progress_bar("soft labels", unit="sequences") as advance:
        manifest = export_token_soft_labels(
            teacher_spec, data_spec, out_dir, temperature=calibration, top_k=top_k,
            shard_rows=DEFAULT_TOKEN_SHARD_ROWS if shard_rows is None else shard_rows, overwrite=overwrite,
            resume=resume, progress=advance, notify=note,
        )
    if json_output:
        print_json({"cache": str(out_dir), "manifest": manifest.to_json()})
        return
    out.print(cache_table(describe_cache(out_dir)))
    note(f"token soft labels written to {out_dir} (values = logits / {manifest.temperature:g})")
