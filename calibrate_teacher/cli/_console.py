"""The CLI's two consoles: stdout carries data, stderr carries talk (progress, warnings)."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

out = Console()
err = Console(stderr=True)


def print_json(document: Any) -> None:
    """Write exactly one JSON document to stdout, unwrapped and unstyled."""
    sys.stdout.write(json.dumps(document, indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()


def warn(message: str) -> None:
    """Print a one-line warning on stderr."""
    err.print(f"[yellow]warning:[/yellow] {message}", markup=True, highlight=False, soft_wrap=True)


def note(message: str) -> None:
    """Print a one-line note on stderr (never markup-interpreted: it may hold paths)."""
    err.print(message, markup=False, highlight=False, soft_wrap=True)
