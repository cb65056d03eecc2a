"""A rich progress bar on stderr for long jobs (samples/s, ETA)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from calibrate_teacher.cli._console import err


@contextlib.contextmanager
def progress_bar(description: str, *, unit: str = "samples") -> Iterator[Callable[[int, int], None]]:
    """Yield ``advance(done, total)``; the bar appears on the first call (the total is known then)."""
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
        disable=not err.is_terminal,
    )
    task: list[TaskID] = []

    def advance(done: int, total: int) -> None:
        if not task:
            task.append(bar.add_task(description, total=total, rate=""))
        bar.advance(task[0], done)
        speed = bar.tasks[0].speed
        bar.update(task[0], rate=f"{speed:,.0f} {unit}/s" if speed else "")

    with bar:
        yield advance
