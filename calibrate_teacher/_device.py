"""Choosing the torch device: CUDA when present, unless the caller says otherwise."""

from __future__ import annotations

from typing import Literal

from calibrate_teacher.errors import InvalidValueError

DeviceName = Literal["auto", "cpu", "cuda"]


def resolve_device(device: str = "auto") -> str:
    """Turn ``auto``/``cpu``/``cuda``/``cuda:N`` into a concrete torch device string.

    ``auto`` picks ``cuda`` when torch sees a CUDA device and ``cpu`` otherwise.

    Raises:
        InvalidValueError: ``cuda`` was asked for but torch sees no CUDA device, or the name is unknown.
    """
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu"
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InvalidValueError(
                f"device {device!r}: torch sees no CUDA device; use --device cpu or auto"
            )
        return device
    raise InvalidValueError(f"device {device!r}: expected auto, cpu, cuda or cuda:N")
