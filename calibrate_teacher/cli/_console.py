"""The CLI's two consoles: stdout carries data, stderr carries talk (progress, warnings)."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

# emoji=False: ":factory:" in a message (an --arch value) must print as typed, not as an emoji.
out = Console(emoji=False)
err = Console(stderr=True, emoji=False)


def print_json(document: Any) -> None:
    """Write exactly one JSON document to stdout, unwrapped and unstyled."""
    sys.stdout.write(json.dumps(document, indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()


def warn(message: str) -> None:
    """Print a one-line warning on stderr."""
    from rich.markup import escape

    err.print(f"[yellow]warning:[/yellow] {escape(message)}", markup=True, highlight=False, soft_wrap=True)


def note(message: str) -> None:
    """Print a one-line note on stderr (never markup-interpreted: it may hold paths)."""
    err.print(message, markup=False, highlight=False, soft_wrap=True)
