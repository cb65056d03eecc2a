"""Argument checks shared by the metrics and the temperature search, each written once.

Public functions validate their arguments here, once per call, and then hand them to internals
that do not check again. Every check raises :class:`~calibrate_teacher.errors.InvalidValueError`
naming the argument, what was expected and what it got.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING

from calibrate_teacher.errors import InvalidValueError

if TYPE_CHECKING:
    import torch

__all__ = [
    "validate_bounds",
    "validate_logits",
    "validate_options",
    "validate_probs",
    "validate_temperature",
]


def validate_temperature(value: object, *, name: str = "temperature") -> float:
    """Return ``value`` as a float, refusing booleans, non-numbers, NaN, infinities and ``<= 0``.

    Example:
        >>> validate_temperature(2)
        2.0
        >>> validate_temperature(0.0)
        Traceback (most recent call last):
        ...
        calibrate_teacher.errors.InvalidValueError: temperature must be a finite number > 0, got 0.0
    """
    number = math.nan
    # bool is an int, and float("1.5") parses a string: neither is a temperature.
    if not isinstance(value, bool | str | bytes):
        with contextlib.suppress(TypeError, ValueError):
            number = float(value)  # type: ignore[arg-type]
    if not (math.isfinite(number) and number > 0):
        raise InvalidValueError(f"{name} must be a finite number > 0, got {value}")
    return number


def validate_bounds(bounds: tuple[float, float]) -> tuple[float, float]:
    """Return ``(low, high)`` as floats with ``0 < low < high``, both finite."""
    lo, hi = (float(b) for b in bounds)
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
        raise InvalidValueError(f"bounds must satisfy 0 < low < high, got {bounds}")
    return lo, hi


def validate_options(*, n_bins: int, bootstrap: int = 0) -> None:
    """Check the options every binned metric takes."""
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise InvalidValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
        raise InvalidValueError(f"bootstrap must be an integer >= 0, got {bootstrap!r}")


def validate_logits(logits: torch.Tensor, labels: torch.Tensor, *, name: str = "logits") -> None:
    """Check that ``logits`` ``[N, C]`` and ``labels`` ``[N]`` can be calibrated.

    Raises:
        InvalidValueError: wrong shapes or dtypes, N = 0, C < 2, NaN/Inf logits, labels out of range.
    """
    import torch

    if logits.ndim != 2:
        raise InvalidValueError(f"{name}: expected a 2-D [N, C] logit matrix, got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise InvalidValueError(f"{name}: expected floating-point logits, got {logits.dtype}")
    n, c = logits.shape
    if n == 0:
        raise InvalidValueError(f"{name}: holds no samples (N = 0)")
    if c < 2:
        raise InvalidValueError(f"{name}: needs at least 2 classes, got C = {c}")
    if labels.ndim != 1 or labels.shape[0] != n:
        raise InvalidValueError(
            f"{name}: labels must have shape [{n}] to match the logits, got {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise InvalidValueError(f"{name}: labels must be integers, got {labels.dtype}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= c:
        raise InvalidValueError(f"{name}: labels must lie in [0, {c - 1}], found values from {lo} to {hi}")
    # One sum is ~30x cheaper than isfinite() over N x C; a NaN or Inf always makes it non-finite,
    # and only then (or when finite values overflow the sum) is each element checked.
    if math.isfinite(float(logits.sum())):
        return
    bad_rows = (~torch.isfinite(logits)).any(dim=1)
    if bool(bad_rows.any()):
        raise InvalidValueError(
            f"{name}: {int(bad_rows.sum())} row(s) hold NaN or Inf logits (first at row "
            f"{int(bad_rows.nonzero()[0])}); check the teacher's outputs"
        )


def validate_probs(probs: torch.Tensor, labels: torch.Tensor) -> None:
    """Check a probability matrix: the checks of :func:`validate_logits`, values in [0, 1], rows summing to 1."""
    import torch

    validate_logits(probs, labels, name="probs")
    lo, hi = float(probs.min()), float(probs.max())
    if lo < 0 or hi > 1:
        raise InvalidValueError(
            f"probs: values must lie in [0, 1], found {lo:.4g} to {hi:.4g}; "
            "pass logits to calibration_metrics instead"
        )
    sums = probs.to(torch.float64).sum(dim=1)
    worst = float((sums - 1).abs().max())
    if worst > 1e-3:
        raise InvalidValueError(f"probs: rows must sum to 1, found a row off by {worst:.3g}")
