"""The temperature searches behind :func:`~calibrate_teacher.fit_temperature`: from logits to ``T``.

Safeguarded Newton on ``beta = 1/T`` for ``nll``; for the ECE-like objectives, a grid bracket
over the sweep's points, then a golden-section search on ``log T`` around the deepest grid
minima. The objectives, the grid and the paper's policy are described in ``temperature.py``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from calibrate_teacher import _binning
from calibrate_teacher.metrics import adaece, adaptive_calibration_error_of_logits, ece_parts

if TYPE_CHECKING:
    from collections.abc import Callable

    from calibrate_teacher._passes import ShiftedLogits
    from calibrate_teacher.temperature import SweepPoint

_GOLDEN = (math.sqrt(5) - 1) / 2
#: Grid minima refined by the ECE/AdaECE searches (the deepest first).
_STARTS = 3


def _objective(shifted: ShiftedLogits, objective: str, temperature: float, n_bins: int) -> float:
    """One evaluation of a search objective: only what it needs (no full sweep point)."""
    if objective == "ace":
        return adaptive_calibration_error_of_logits(shifted.shifted, shifted.labels, temperature, n_bins)
    conf = shifted.confidence(temperature)
    if objective == "adaece":
        return adaece(conf, shifted.correct, n_bins)
    over, under, _ = ece_parts(_binning.equal_width_bins(conf, shifted.correct, n_bins))
    return over + under


def _fit_nll(prepared: ShiftedLogits, lo: float, hi: float, tol: float) -> tuple[float, int, int]:
    """Safeguarded Newton on beta = 1/T; returns (T, Newton steps, full passes)."""
    b_lo, b_hi = 1.0 / hi, 1.0 / lo
    steps = passes = 0
    beta = min(max(1.0, b_lo), b_hi)
    # A strided subsample gets close for a fraction of the cost; full passes then polish.
    stride = max(1, prepared.n // 4096)
    for pass_stride in ((stride, 1) if stride > 1 else (1,)):
        stage_tol = tol if pass_stride == 1 else max(tol, 1e-3)
        a, b = b_lo, b_hi  # bracket on beta: gradient < 0 below the root, > 0 above it
        tried_bound = False
        for _ in range(100):
            grad, curv = prepared.newton_terms(beta, pass_stride)
            steps += 1
            passes += pass_stride == 1
            if grad > 0:
                b = beta
            else:
                a = beta
            if (beta <= b_lo and grad >= 0) or (beta >= b_hi and grad <= 0):
                break  # the minimum lies on (or past) a bound
            new = beta - grad / curv if curv > 0 else (math.inf if grad < 0 else 0.0)
            if not (a < new < b):
                # Newton left the bracket: try the bound it points past once, else bisect (log space).
                edge = b_hi if new >= b else b_lo
                if not tried_bound and edge in (a, b):
                    new, tried_bound = edge, True
                else:
                    new = math.sqrt(a * b)
            done = abs(1.0 / new - 1.0 / beta) < stage_tol
            beta = new
            if done:
                break
    return 1.0 / beta, steps, passes


def _search(
    prepared: ShiftedLogits,
    objective: str,
    points: tuple[SweepPoint, ...],
    lo: float,
    hi: float,
    n_bins: int,
    tol: float,
) -> tuple[float, float, int, int]:
    """Grid bracket, then golden section on log T around the best few grid minima.

    ECE-like objectives are not smooth in T (samples jump between bins), so one refinement can
    settle in a shallower dip than a neighbouring one: the best :data:`_STARTS` local minima of
    the grid are each refined (one for ``ace``, whose evaluations are full sorts). Returns
    ``(T, value, evaluations, passes)``.
    """
    evals = 0

    def value(t: float) -> float:
        nonlocal evals
        evals += 1
        return _objective(prepared, objective, t, n_bins)

    temps = [p.temperature for p in points]
    if objective == "ace":
        values = [value(t) for t in temps]
    else:
        values = [p.ece if objective == "ece" else p.adaece for p in points]
        evals += len(values)
    last = len(temps) - 1
    minima = [
        i for i in range(len(temps))
        if (i == 0 or values[i] <= values[i - 1]) and (i == last or values[i] <= values[i + 1])
    ]
    minima.sort(key=lambda i: (values[i], abs(math.log(temps[i]))))
    best_t, best_v = temps[minima[0]], values[minima[0]]
    for i in minima[: 1 if objective == "ace" else _STARTS]:
        t, v = _golden(value, math.log(temps[max(i - 1, 0)]), math.log(temps[min(i + 1, last)]), tol)
        if v < best_v:
            best_t, best_v = t, v
    best_t = min(max(best_t, lo), hi)
    return best_t, best_v, evals, evals


def _golden(value: Callable[[float], float], a: float, b: float, tol: float) -> tuple[float, float]:
    """Golden-section search for a minimum of ``value(exp(x))`` on ``[a, b]``; returns (T, value)."""
    x1, x2 = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    f1, f2 = value(math.exp(x1)), value(math.exp(x2))
    while b - a > tol:
        if f1 <= f2:
            b, x2, f2 = x2, x1, f1
            x1 = b - _GOLDEN * (b - a)
            f1 = value(math.exp(x1))
        else:
            a, x1, f1 = x1, x2, f2
            x2 = a + _GOLDEN * (b - a)
            f2 = value(math.exp(x2))
    return (math.exp(x1), f1) if f1 <= f2 else (math.exp(x2), f2)
