"""``calibrate-teacher inspect``: what a soft-label cache holds, and whether it is intact."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from calibrate_teacher.cli import _options as o
from calibrate_teacher.cli._console import err, out, print_json
from calibrate_teacher.errors import CacheError

if TYPE_CHECKING:
    from rich.table import Table

    from calibrate_teacher.soft_labels import CacheDescription, CacheManifest


def inspect_cache(
    cache: Annotated[
        Path, typer.Argument(help="The cache folder (holding manifest.json).", file_okay=False)
    ],
    verify: Annotated[
        bool,
        typer.Option(
            "--verify", help="Also read every shard: checksum, header, shapes, row numbers, keys."
        ),
    ] = False,
    json_output: o.JsonOpt = False,
) -> None:
    """Summarise a soft-label cache; with --verify, check every file against its manifest.

    Shows the teacher, data, calibration temperature, layout and shards. An unfinished export
    shows how many shards are done. --verify exits 1 and names each damaged file.

    Examples:
      calibrate-teacher inspect cache/
      calibrate-teacher inspect cache/ --verify
      calibrate-teacher inspect cache/ --verify --json
    """
    from calibrate_teacher.soft_labels import describe_cache

    description = describe_cache(cache, verify=verify)
    if json_output:
        print_json(description.to_json())
    else:
        out.print(cache_table(description))
        check = description.verification
        if check is not None and check.ok:
            out.print(f"verified: {check.shards_checked} shard(s) and keys.txt match the manifest")
        elif check is not None:
            for problem in check.problems:
                err.print(f"- {problem}", markup=False, highlight=False, soft_wrap=True)
    check = description.verification
    if check is not None and not check.ok:
        more = f" (and {len(check.problems) - 1} more)" if len(check.problems) > 1 else ""
        raise CacheError(f"{cache}: verification failed: {check.problems[0]}{more}")


def cache_table(description: CacheDescription) -> Table:
    """Render a cache's manifest as a two-column table."""
    from rich.table import Table

    m = description.manifest
    table = Table(
        title=f"soft-label cache {description.path}", show_header=False, title_justify="left"
    )
    table.add_column(style="bold")
    table.add_column()
    status = (
        "complete"
        if m.complete
        else f"INCOMPLETE: {description.shards_done} of {m.num_shards} shards done "
        "(rerun the export to finish)"
    )
    cal = m.calibration
    how = "fixed" if cal.method == "fixed" else f"{cal.method} ({cal.objective or 'objective n/a'})"
    if cal.report:
        how += f", from {cal.report}"
    layout = "dense float16 logits" if m.layout.k is None else (
        f"top-{m.layout.k} float16 logits + {m.layout.index_dtype} classes"
    )
    rows = [
        ("status", status),
        ("teacher", f"{m.teacher.get('file', '?')} ({m.teacher.get('format', '?')}, "
                    f"sha256 {str(m.teacher.get('sha256', '?'))[:12]})"),
        ("data", _data_text(m.data)),
        _size_row(m),
        ("temperature T", f"{m.temperature:.4g} ({how}); values stored = logits / T"),
        ("layout", f"{layout}, full-row logsumexp in float32"),
        ("shards", f"{m.num_shards} of up to {m.layout.shard_rows:,} rows"),
        ("size on disk", _size(description.bytes_on_disk)),
        ("written", f"{m.created_at or '-'} by calibrate-teacher {m.tool_version}, "
                    f"format {m.format_version}"),
    ]
    if cal.metrics:
        shown = {k: cal.metrics[k] for k in ("ece", "ace", "nll", "accuracy") if k in cal.metrics}
        rows.append(("metrics at T", ", ".join(f"{k} {v:.4f}" for k, v in shown.items()) or "-"))
    for name, value in rows:
        table.add_row(name, value)
    return table


def _data_text(data: object) -> str:
    source = data.get("source") if isinstance(data, dict) else None
    if isinstance(source, dict):
        return f"{source.get('path', '?')} ({source.get('kind', 'data')})"
    return "-"


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:,.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    return f"{n} B"


def _size_row(m: CacheManifest) -> tuple[str, str]:
    """``samples x classes``, or for a token cache ``sequences, tokens x vocabulary``."""
    if m.layout.unit != "token":
        return "samples x classes", f"{m.num_samples:,} x {m.num_classes:,}"
    tokens = m.data.get("num_tokens")
    counted = f"{tokens:,}" if isinstance(tokens, int) else "?"
    return "sequences, tokens x vocabulary", f"{m.num_samples:,}, {counted} x {m.num_classes:,}"
