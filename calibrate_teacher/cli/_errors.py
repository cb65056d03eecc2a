"""One table that maps the library's errors to the one line the CLI prints."""

from __future__ import annotations

import os

from calibrate_teacher._io import FILESYSTEM_ERRNOS
from calibrate_teacher.errors import (
    BakeError,
    CacheError,
    CalibrateTeacherError,
    InputError,
    InvalidValueError,
    MissingDependencyError,
    OutputError,
    OutputExistsError,
    TeacherError,
)

#: Error type -> the label printed before its message. Order matters: the first match wins.
CLI_ERROR_LABELS: tuple[tuple[type[BaseException], str], ...] = (
    (OutputExistsError, "output exists"),
    (OutputError, "cannot write"),
    (MissingDependencyError, "missing dependency"),
    (InvalidValueError, "invalid input"),
    (InputError, "bad input"),
    (TeacherError, "teacher error"),
    (BakeError, "bake failed"),
    (CacheError, "cache error"),
    (CalibrateTeacherError, "error"),
)

DEBUG_ENV = "CALIBRATE_TEACHER_DEBUG"


def debug_enabled() -> bool:
    """True when ``CALIBRATE_TEACHER_DEBUG`` asks for tracebacks."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def format_known_exception(exc: BaseException) -> str | None:
    """Return the one-line message for a known error, or None for anything else (a bug).

    Besides our own errors, an ``OSError`` that the file system raised (no space, read-only,
    permission denied...) is known: it names its file where the OS said which one.
    """
    for kind, label in CLI_ERROR_LABELS:
        if isinstance(exc, kind):
            text = " ".join(str(exc).split())
            return f"Error ({label}): {text}"
    if isinstance(exc, OSError) and exc.errno in FILESYSTEM_ERRNOS:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"Error (file system): {where}{exc.strerror}; nothing was half-written, fix it and rerun"
    return None
