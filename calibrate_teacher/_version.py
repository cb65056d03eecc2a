"""The version, written once (pyproject.toml reads it; reports and cache manifests record it)."""

from __future__ import annotations

__version__ = "0.1.0"


def tool_version() -> str:
    """The calibrate-teacher version recorded in reports and manifests."""
    return __version__
