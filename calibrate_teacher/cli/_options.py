"""Options shared by several commands, defined once as ``Annotated`` aliases.

Flags are the kebab-case spelling of the library keyword they feed (``--n-bins`` -> ``n_bins=``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print exactly one JSON document on stdout instead of tables.")
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace outputs that already exist (never done silently).")
]
ReportOpt = Annotated[
    Path | None,
    typer.Option("--report", help="Also write the JSON report to this file.", dir_okay=False),
]
NBinsOpt = Annotated[
    int,
    typer.Option(
        "--n-bins", "--bins", min=1, max=10_000, help="Number of bins for ECE/MCE/AdaECE/ACE."
    ),
]
def _device(value: str) -> str:
    from calibrate_teacher._device import DEVICE_KINDS, check_device
    from calibrate_teacher.errors import InvalidValueError

    try:
        return check_device(value)
    except InvalidValueError:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(DEVICE_KINDS)}") from None


DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device",
        callback=_device,
        metavar="auto|cpu|cuda|cuda:N",
        help="Where the teacher runs: auto (CUDA when present), cpu, cuda or cuda:N.",
    ),
]
BatchSizeOpt = Annotated[
    int, typer.Option("--batch-size", min=1, help="Samples per teacher call.")
]
WorkersOpt = Annotated[
    int, typer.Option("--workers", min=0, help="Data-loading worker processes (0: in process).")
]
LogitsLabelsOpt = Annotated[
    Path | None,
    typer.Option(
        "--labels",
        help="Labels file for .npy logits (default: X.labels.npy or labels.npy beside them).",
        dir_okay=False,
    ),
]
BootstrapOpt = Annotated[
    int,
    typer.Option(
        "--bootstrap",
        min=0,
        help="Bootstrap resamples for the 95% confidence intervals of ECE and ACE (0: none).",
    ),
]
