"""Temperature search: the ``T`` that calibrates ``softmax(logits / T)``.

Objectives:

- ``nll``: the exact minimiser of the mean negative log-likelihood. NLL is convex in
  ``beta = 1/T``, so it is found by safeguarded Newton on ``beta`` (gradient and curvature in one
  pass over the logits per step, bisection whenever a step would leave the bracket), started
  from a fit on a strided subsample; tolerance ``1e-5`` in ``T``. Logits are shifted by their row
  maximum first, so saturated softmaxes stay exact (log space).
- ``ece``, ``adaece``, ``ace``: the grid of ``grid`` temperatures log-spaced over ``bounds`` (plus
  ``T = 1`` and ``T = 1.5``) brackets the best values, then a golden-section search on ``log T``
  refines around each of the 3 deepest grid minima (1 for ``ace``). These objectives are step
  functions of ``T``: the result is the best dip the search resolves, not a guaranteed global
  minimum.
- ``paper``: the teacher-only policy of Kim et al. (arXiv 2508.20224): the ``T`` that minimises
  ECE *within* their robust range 1.5-3.0, so the teacher is never sharpened and ends near
  calibrated or slightly underconfident. Searched as ``ece`` on a 64-point grid over the range
  plus the sweep's points there; the unrestricted ``ece`` result is taken when it lies inside.
- ``fixed``: a given ``T``; by default 1.5, the paper's default.

Every fit reports the metrics before (``T = 1``) and after, the sweep over the grid, and where
``T`` sits relative to the paper's range. KD trainers that divide teacher *and* student logits by
their own ``tau`` then see the calibrated teacher at ``tau * T``.

Cost: a call pays for its search. ``nll`` costs about 3-4 passes over the logits (validation,
the row-max shift, two Newton passes and the NLL at ``T``); the ECE-like searches add the grid and
the refinement. The two full reports (each some 20-30 passes: ACE sorts every class column) and,
for ``nll`` and ``fixed``, the sweep are computed when :attr:`TemperatureFit.before`,
:attr:`~TemperatureFit.after` or :attr:`~TemperatureFit.sweep` is first read (``to_json`` reads
all three), from the logits the fit was given; they are not copied, so read the reports before
modifying those logits in place (a fit refuses to report on logits changed since).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Literal

from calibrate_teacher import _binning
from calibrate_teacher._passes import ShiftedLogits
from calibrate_teacher._search import _fit_nll, _search
from calibrate_teacher._validate import validate_bounds, validate_logits, validate_options, validate_temperature
from calibrate_teacher.errors import InvalidValueError
from calibrate_teacher.metrics import (
    DEFINITIONS,
    CalibrationMetrics,
    adaece,
    compute_metrics,
    ece_parts,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch

__all__ = [
    "OBJECTIVES",
    "PAPER_DEFAULT_T",
    "PAPER_RANGE",
    "SweepPoint",
    "TemperatureFit",
    "fit_temperature",
    "paper_block",
    "paper_position",
    "sweep",
]

Objective = Literal["nll", "ece", "adaece", "ace", "paper", "fixed"]
OBJECTIVES: tuple[str, ...] = ("nll", "ece", "adaece", "ace", "paper", "fixed")
PAPER_DEFAULT_T = 1.5
PAPER_RANGE = (1.5, 3.0)


def paper_position(temperature: float) -> str:
    """Where ``temperature`` sits relative to the paper's robust range 1.5-3.0: below, within, above."""
    lo, hi = PAPER_RANGE
    return "below" if temperature < lo else "above" if temperature > hi else "within"


def paper_block(temperature: float) -> dict[str, object]:
    """The ``paper`` block of every fit report: the paper's default T, its range, where T sits."""
    return {
        "default_temperature": PAPER_DEFAULT_T,
        "robust_range": list(PAPER_RANGE),
        "position": paper_position(temperature),
        "sharpens": temperature < 1.0,
    }
#: Temperatures tried within PAPER_RANGE by ``objective="paper"`` (spacing about 1.1 % in T).
PAPER_GRID = 64


@dataclass(frozen=True)
class SweepPoint:
    """Top-label metrics at one temperature (float32 softmax, float64 sums).

    The full report (:class:`~calibrate_teacher.metrics.CalibrationMetrics`) is computed only
    before and after; a sweep point keeps what one cheap pass over the logits gives.
    """

    temperature: float
    nll: float
    confidence: float
    ece: float
    ece_over: float
    ece_under: float
    mce: float
    adaece: float


class _Reports:
    """The reports of one fit, computed from the fit's logits when first read, then kept."""

    def __init__(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        *,
        temperatures: list[float],
        points: tuple[SweepPoint, ...] | None,
        n_bins: int,
        bootstrap: int,
        seed: int,
    ) -> None:
        self._data = (logits, labels)
        self._versions = _versions(logits, labels)
        self._temperatures = temperatures
        self._n_bins, self._bootstrap, self._seed = n_bins, bootstrap, seed
        self._points = points
        self._metrics: dict[float, CalibrationMetrics] = {}

    def _logits(self) -> tuple[torch.Tensor, torch.Tensor]:
        if _versions(*self._data) != self._versions:
            raise InvalidValueError(
                "logits: modified in place after fit_temperature; read the fit's before, after and "
                "sweep first, or fit on a copy"
            )
        return self._data

    def metrics(self, temperature: float) -> CalibrationMetrics:
        """The full report at ``temperature`` (``before`` is T = 1, ``after`` the fitted T)."""
        if temperature not in self._metrics:
            logits, labels = self._logits()
            self._metrics[temperature] = compute_metrics(
                logits, labels, temperature=temperature, n_bins=self._n_bins, bootstrap=self._bootstrap,
                seed=self._seed,
            )
        return self._metrics[temperature]

    def sweep(self) -> tuple[SweepPoint, ...]:
        """The sweep over the grid (already there when the search needed it)."""
        if self._points is None:
            prepared = ShiftedLogits(*self._logits())
            self._points = tuple(_point(prepared, t, self._n_bins) for t in self._temperatures)
        return self._points


def _versions(*tensors: torch.Tensor) -> tuple[int | None, ...]:
    """In-place modification counters (None for inference-mode tensors, which keep none)."""
    out: list[int | None] = []
    for t in tensors:
        try:
            out.append(t._version)
        except RuntimeError:
            out.append(None)
    return tuple(out)


@dataclass(frozen=True)
class TemperatureFit:
    """The chosen temperature, how it was found, and the teacher before and after.

    ``before``, ``after`` and ``sweep`` are computed when first read (see the module docstring).

    Attributes:
        temperature: The chosen ``T`` (divide the logits by it).
        objective: What was minimised (``fixed`` for a given ``T``).
        objective_value: The objective at ``T`` (None for ``fixed``).
        iterations: Optimiser steps (Newton steps, or objective evaluations of a search).
        passes: Passes over all the logits spent on the search.
        bounds: The ``(low, high)`` range searched.
        at_bound: True when ``T`` sits on a bound (widen ``bounds`` to look further).
    """

    temperature: float
    objective: str
    objective_value: float | None
    iterations: int
    passes: int
    bounds: tuple[float, float]
    at_bound: bool
    _reports: _Reports = field(repr=False, compare=False)

    @property
    def before(self) -> CalibrationMetrics:
        """Metrics at ``T = 1`` (computed on first read)."""
        return self._reports.metrics(1.0)

    @property
    def after(self) -> CalibrationMetrics:
        """Metrics at ``T`` (computed on first read)."""
        return self._reports.metrics(self.temperature)

    @property
    def sweep(self) -> tuple[SweepPoint, ...]:
        """Top-label metrics over the grid of temperatures (computed on first read if the search did not)."""
        return self._reports.sweep()

    @property
    def verdict(self) -> str:
        """Whether the teacher ends ``overconfident`` or ``underconfident`` at ``T``."""
        return self.after.verdict

    @property
    def paper_range(self) -> str:
        """Where ``T`` sits relative to the paper's robust range 1.5-3.0: below, within, above."""
        return paper_position(self.temperature)

    def to_json(self) -> dict[str, object]:
        """The JSON report: temperature, objective, before, after, sweep, definitions..."""
        return {
            "temperature": self.temperature,
            "objective": self.objective,
            "objective_value": self.objective_value,
            "verdict": self.verdict,
            "paper": paper_block(self.temperature),
            "iterations": self.iterations,
            "passes": self.passes,
            "bounds": list(self.bounds),
            "at_bound": self.at_bound,
            "before": self.before.to_json(),
            "after": self.after.to_json(),
            "sweep": [asdict(p) for p in self.sweep],
            "definitions": dict(DEFINITIONS),
        }


def fit_temperature(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    objective: Objective = "ece",
    temperature: float | None = None,
    bounds: tuple[float, float] = (0.05, 20.0),
    n_bins: int = 15,
    grid: int = 64,
    tol: float = 1e-5,
    bootstrap: int = 0,
    seed: int = 0,
) -> TemperatureFit:
    """Find the temperature that calibrates the teacher and measure it before and after.

    Args:
        logits: ``[N, C]`` teacher logits (any float dtype, CPU or CUDA).
        labels: ``[N]`` integer labels.
        objective: ``nll`` (exact), ``ece``, ``adaece``, ``ace`` (search), ``paper`` (ECE within
            the paper's 1.5-3.0) or ``fixed``.
        temperature: The ``T`` for ``fixed`` (default 1.5, the paper's); not allowed otherwise.
        bounds: The range of ``T`` searched.
        n_bins: Bins for every binned metric.
        grid: Temperatures in the sweep (log-spaced over ``bounds``, plus 1 and 1.5).
        tol: Tolerance on ``T`` for ``nll`` and the refinement of the searches.
        bootstrap: Resamples for 95% intervals of ECE and ACE in ``before``/``after``.
        seed: Seed of the bootstrap.

    Returns:
        A :class:`TemperatureFit`; its ``before``, ``after`` and ``sweep`` are computed when first
        read, so a caller that needs only ``T`` pays only for the search.

    Raises:
        InvalidValueError: bad logits/labels, unknown objective, bad bounds, options or temperature.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.randint(0, 5, (400,), generator=g)
        >>> z = 4 * torch.nn.functional.one_hot(y, 5) + 3 * torch.randn(400, 5, generator=g)
        >>> fit = fit_temperature(z, y, objective="nll")
        >>> fit.after.nll < fit.before.nll
        True
    """
    validate_logits(logits, labels)
    lo, hi = validate_bounds(bounds)
    if objective not in OBJECTIVES:
        raise InvalidValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if grid < 2:
        raise InvalidValueError(f"grid must be at least 2 temperatures, got {grid}")
    validate_options(n_bins=n_bins, bootstrap=bootstrap)
    if temperature is not None and objective != "fixed":
        raise InvalidValueError("a temperature is given only with objective='fixed'")
    temps = _grid(lo, hi, grid)
    points: tuple[SweepPoint, ...] | None = None
    value: float | None
    if objective == "fixed":
        t = validate_temperature(PAPER_DEFAULT_T if temperature is None else temperature)
        value, iterations, passes = None, 0, 0
    elif objective == "nll":
        prepared = ShiftedLogits(logits, labels)
        t, iterations, passes = _fit_nll(prepared, lo, hi, tol)
        value = _nll(prepared, t)
    else:
        prepared = ShiftedLogits(logits, labels)
        points = tuple(_point(prepared, t, n_bins) for t in temps)
        if objective == "paper":
            t, value, iterations, passes = _search_paper(prepared, points, lo, hi, n_bins, tol)
        else:
            t, value, iterations, passes = _search(prepared, objective, points, lo, hi, n_bins, tol)
    at_bound = objective not in ("fixed", "paper") and (abs(t - lo) <= 2 * tol * lo or abs(t - hi) <= 2 * tol * hi)
    reports = _Reports(logits, labels, temperatures=temps, points=points, n_bins=n_bins, bootstrap=bootstrap,
                       seed=seed)
    return TemperatureFit(
        temperature=t,
        objective=objective,
        objective_value=value,
        iterations=iterations,
        passes=passes,
        bounds=(lo, hi),
        at_bound=at_bound,
        _reports=reports,
    )


def sweep(
    logits: torch.Tensor, labels: torch.Tensor, temperatures: Sequence[float], *, n_bins: int = 15
) -> tuple[SweepPoint, ...]:
    """Top-label metrics (NLL, ECE and its parts, MCE, AdaECE, confidence) at each temperature.

    Example:
        >>> import torch
        >>> pts = sweep(torch.tensor([[3.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]), [1.0, 2.0])
        >>> [round(p.confidence, 4) for p in pts]  # mean of 1/(1+e^-3), 1/(1+e^-1); then halved logits
        [0.8418, 0.72]
    """
    validate_logits(logits, labels)
    validate_options(n_bins=n_bins)
    temps = [validate_temperature(t, name="temperatures") for t in temperatures]
    prepared = ShiftedLogits(logits, labels)
    return tuple(_point(prepared, t, n_bins) for t in temps)


# --- internals ---------------------------------------------------------------------------


def _grid(lo: float, hi: float, size: int) -> list[float]:
    step = (math.log(hi) - math.log(lo)) / (size - 1)
    temps = {math.exp(math.log(lo) + i * step) for i in range(size)}
    temps |= {t for t in (1.0, PAPER_DEFAULT_T) if lo <= t <= hi}
    return sorted(temps)


def _nll(shifted: ShiftedLogits, temperature: float, conf: torch.Tensor | None = None) -> float:
    """Mean NLL at ``temperature``: ``-log p_y = log S - z_y / T``, with ``S = 1 / conf``."""
    conf = shifted.confidence(temperature) if conf is None else conf
    return float((-conf.log() - shifted.label_logit / temperature).mean())


def _point(shifted: ShiftedLogits, temperature: float, n_bins: int) -> SweepPoint:
    conf = shifted.confidence(temperature)
    over, under, mce = ece_parts(_binning.equal_width_bins(conf, shifted.correct, n_bins))
    return SweepPoint(
        temperature=temperature,
        nll=_nll(shifted, temperature, conf),
        confidence=float(conf.mean()),
        ece=over + under,
        ece_over=over,
        ece_under=under,
        mce=mce,
        adaece=adaece(conf, shifted.correct, n_bins),
    )


def _search_paper(
    prepared: ShiftedLogits, points: tuple[SweepPoint, ...], lo: float, hi: float, n_bins: int, tol: float
) -> tuple[float, float, int, int]:
    """ECE within :data:`PAPER_RANGE`; returns ``(T, value, evaluations, passes)`` as :func:`_search`."""
    p_lo, p_hi = PAPER_RANGE
    # ECE is bumpy in T: a fine grid over the range (plus the sweep's own points in it) finds
    # the right dip before the golden-section refinement.
    inside = {p.temperature: p for p in points if p_lo <= p.temperature <= p_hi}
    for t in _grid(p_lo, p_hi, PAPER_GRID):
        if t not in inside:
            inside[t] = _point(prepared, t, n_bins)
    paper_points = tuple(inside[t] for t in sorted(inside))
    t, value, iterations, passes = _search(prepared, "ece", paper_points, p_lo, p_hi, n_bins, tol)
    # The unrestricted ECE search may find a deeper dip that happens to lie inside the range.
    t_all, v_all, it_all, ps_all = _search(prepared, "ece", points, lo, hi, n_bins, tol)
    if p_lo <= t_all <= p_hi and v_all < value:
        t, value = t_all, v_all
    return t, value, iterations + it_all, passes + ps_all
