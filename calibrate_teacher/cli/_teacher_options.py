"""Options that say how to load a teacher, shared by every command that takes one."""

from __future__ import annotations

from typing import Annotated

import typer

ArchOpt = Annotated[
    str | None,
    typer.Option(
        "--arch",
        help="For weights-only files (.safetensors, or a state dict in .pt/.pth/.bin): the architecture factory, as "
        "pkg.module:factory or path/to/file.py:factory. Imports that code.",
    ),
]
ArchKwargsOpt = Annotated[
    str | None,
    typer.Option(
        "--arch-kwargs",
        help="JSON keyword arguments for the --arch factory, e.g. '{\"num_classes\": 100}'.",
    ),
]
OutputNameOpt = Annotated[
    str | None,
    typer.Option("--output", help="The model output holding the logits, when it has several."),
]
HeadOpt = Annotated[
    str | None,
    typer.Option(
        "--head",
        help="safetensors: the final linear layer to fold 1/T into (default: found by a probe).",
    ),
]
