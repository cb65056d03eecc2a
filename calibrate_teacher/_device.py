"""Choosing the torch device: CUDA when present, unless the caller says otherwise."""

from __future__ import annotations

from typing import Literal

from calibrate_teacher.errors import InvalidValueError

DeviceName = Literal["auto", "cpu", "cuda"]
#: The device names every teacher takes (``cuda:N`` for a numbered GPU).
DEVICE_KINDS: tuple[str, ...] = ("auto", "cpu", "cuda", "cuda:N")


def check_device(device: object) -> str:
    """Return ``device`` if it is ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (nothing is imported).

    Raises:
        InvalidValueError: naming the value and the valid kinds.

    >>> check_device("cuda:1")
    'cuda:1'
    """
    import re

    if not isinstance(device, str) or re.fullmatch(r"auto|cpu|cuda(:\d+)?", device) is None:
        raise InvalidValueError(f"device {device!r}: expected one of {', '.join(DEVICE_KINDS)}")
    return device


def resolve_device(device: str = "auto") -> str:
    """Turn ``auto``/``cpu``/``cuda``/``cuda:N`` into a concrete torch device string.

    ``auto`` picks ``cuda`` when torch sees a CUDA device and ``cpu`` otherwise.

    Raises:
        InvalidValueError: ``cuda`` was asked for but torch sees no CUDA device, or the name is unknown.
    """
    import torch

    check_device(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu"
    if (device == "cuda" or device.startswith("cuda:")) and not torch.cuda.is_available():
        raise InvalidValueError(
            f"device {device!r}: torch sees no CUDA device; use --device cpu or auto"
        )
    return device
