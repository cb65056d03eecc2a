"""The ``calibrate-teacher`` command line: a thin Typer skin over the library.

Each command lives in its own module, parses options, calls one library function and renders
what it returns. stdout carries data (``--json`` gives exactly one JSON document), stderr carries
talk. Exit codes: 0 ok, 1 error, 2 usage, 130 interrupted.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from calibrate_teacher.cli import bake, evaluate, export_soft_labels, fit, inspect_cache
from calibrate_teacher.cli._console import err
from calibrate_teacher.cli._errors import debug_enabled, format_known_exception

app = typer.Typer(
    name="calibrate-teacher",
    help=(
        "Measure and fix a teacher's calibration before knowledge distillation.\n\n"
        "A teacher's calibration error (ECE) predicts how well a student distils from it "
        "(Kim et al., arXiv 2508.20224); temperature-scaling the teacher alone (T = 1.5 by "
        "default, robust in 1.5-3.0) lifts students. This tool measures the teacher, finds T, "
        "and writes a temperature-baked teacher and soft labels for your KD trainer."
    ),
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

def _version(value: bool) -> None:
    if value:
        from calibrate_teacher import __version__

        typer.echo(f"calibrate-teacher {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Measure and fix a teacher's calibration before knowledge distillation."""


app.command("evaluate")(evaluate.evaluate)
app.command("fit")(fit.fit)
app.command("bake")(bake.bake)
app.command("export-soft-labels")(export_soft_labels.export_soft_labels)
app.command("inspect")(inspect_cache.inspect_cache)


_INTERRUPTED = 130
_INTERRUPTED_LINE = "Interrupted. Completed outputs are kept; rerun the same command to resume."


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; known errors become one line on stderr and exit code 1."""
    try:
        app(args=argv, prog_name="calibrate-teacher")
    except SystemExit as exc:
        # Typer turns Ctrl-C (KeyboardInterrupt) into exit code 130 before we could see it.
        if exc.code == _INTERRUPTED:
            err.print(_INTERRUPTED_LINE, markup=False, highlight=False)
        raise
    except KeyboardInterrupt:  # raised outside Typer's own handler (while it starts up)
        if debug_enabled():
            raise
        err.print(_INTERRUPTED_LINE, markup=False, highlight=False)
        sys.exit(_INTERRUPTED)
    except Exception as exc:
        message = format_known_exception(exc)
        if message is None or debug_enabled():
            raise
        err.print(message, markup=False, highlight=False, soft_wrap=True)
        sys.exit(1)
