"""The exceptions calibrate-teacher raises.

Every message says what happened, which input it concerns, and what to do about it; the CLI
prints the message as one line (``cli/_errors.py``) and exits 1. Anything else that escapes is a
bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "BakeError",
    "CacheError",
    "CalibrateTeacherError",
    "InputError",
    "InvalidValueError",
    "MissingDependencyError",
    "OutputError",
    "OutputExistsError",
    "TeacherError",
]


class CalibrateTeacherError(Exception):
    """Base class of every error calibrate-teacher raises on purpose."""


class InputError(CalibrateTeacherError):
    """An input file or folder is missing, unreadable, or holds the wrong thing."""


class InvalidValueError(CalibrateTeacherError, ValueError):
    """An argument has a value the function cannot accept (NaN logits, labels out of range...)."""


class TeacherError(CalibrateTeacherError):
    """A teacher model cannot be loaded, or fails or misbehaves when run."""


class BakeError(CalibrateTeacherError):
    """A temperature could not be baked into a teacher, or the baked teacher failed its check."""


class CacheError(CalibrateTeacherError):
    """A soft-label cache is incomplete, corrupt, or does not match what is being written."""


class OutputExistsError(CalibrateTeacherError):
    """An output path already exists and overwriting was not asked for."""


class OutputError(CalibrateTeacherError):
    """An output cannot be written: a read-only or full disk, no permission, a file in the way."""


class MissingDependencyError(CalibrateTeacherError, ImportError):
    """An optional package is needed for this feature; the message says what to install."""
