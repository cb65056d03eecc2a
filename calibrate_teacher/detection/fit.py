"""Temperature for detection teachers: T on the matched candidates' class logits.

The fit set is made once, at ``T = 1``: the detections kept at the operating point are matched
(:func:`~calibrate_teacher.detection.candidates.detections_at`), and each *candidate box* among
them that is not only ignored becomes one sample: its ground-truth class when one of its
detections is a true positive (the highest-scoring one), else background.

- ``nll`` on a ``softmax`` head: multiclass NLL over the ``C + 1`` logits,
  ``mean[logsumexp(beta z) - beta z_y]`` (``y`` the background column for false positives).
- ``nll`` on a ``sigmoid`` head: binary NLL of every class of every sample,
  ``mean[softplus(beta z_c) - y_c beta z_c]`` (``y_c = 1`` only for the matched class of a TP).
  Both are convex in ``beta = 1/T`` and solved exactly by safeguarded Newton in float64
  (as :mod:`calibrate_teacher.temperature`). With an objectness logit (YOLOX), the class
  probability is ``sigmoid(o) sigmoid(beta z_c)``, no longer of that form: the NLL is then
  minimised by golden-section search on ``log T`` (tolerance ``tol``).
- ``dece``: D-ECE (confidence-only) re-evaluated at each ``T``: because ``T`` moves scores across
  the threshold and reorders NMS, every evaluation rescores the pool and cuts and matches it
  again. A log-spaced grid over ``bounds`` (plus 1 and 1.5) brackets the best values, a
  golden-section search on ``log T`` refines the 3 deepest grid minima.
- ``fixed``: a given T (default 1.5, the paper's).

Every fit carries the sweep over the grid (D-ECE, its parts, detections, TP, FP at each T).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal

from calibrate_teacher._search import _golden
from calibrate_teacher._validate import validate_bounds, validate_temperature
from calibrate_teacher.detection.base import OperatingPoint
from calibrate_teacher.detection.candidates import CandidatePool, detections_at, softmax_rows
from calibrate_teacher.detection.matching import Matching
from calibrate_teacher.detection.metrics import detection_calibration_error
from calibrate_teacher.errors import InvalidValueError

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

__all__ = [
    "DETECTION_OBJECTIVES",
    "DetectionSweepPoint",
    "DetectionTemperatureFit",
    "fit_detection_temperature",
    "nll_fit_set",
    "sigmoid_nll_temperature",
    "softmax_nll_temperature",
]

DetectionObjective = Literal["nll", "dece", "fixed"]
DETECTION_OBJECTIVES: tuple[str, ...] = ("nll", "dece", "fixed")
_STARTS = 3


@dataclass(frozen=True)
class DetectionSweepPoint:
    """The detections and their D-ECE at one temperature."""

    temperature: float
    dece: float
    dece_over: float
    dece_under: float
    num_detections: int
    num_tp: int
    num_fp: int
    confidence: float


@dataclass(frozen=True)
class DetectionTemperatureFit:
    """The chosen T of a detection teacher and how it was found.

    Attributes:
        temperature: The chosen T (divide the class logits by it).
        objective: ``nll``, ``dece`` or ``fixed``.
        objective_value: The objective at T (None for ``fixed``).
        head: The head kind fitted.
        fit_samples: Candidate boxes in the NLL fit set (TP: class, FP: background).
        iterations: Newton steps or objective evaluations.
        bounds: The range searched.
        at_bound: T sits on a bound.
        sweep: D-ECE and counts over the grid.
        exact_up_to: Largest T at which the T = 1 candidate selection is provably complete
            (None: not known for this head; ``inf``: every T).
    """

    temperature: float
    objective: str
    objective_value: float | None
    head: str
    fit_samples: int
    iterations: int
    bounds: tuple[float, float]
    at_bound: bool
    sweep: tuple[DetectionSweepPoint, ...]
    exact_up_to: float | None

    def to_json(self) -> dict[str, object]:
        """The fit as JSON."""
        return {
            "temperature": self.temperature,
            "objective": self.objective,
            "objective_value": self.objective_value,
            "head": self.head,
            "fit_samples": self.fit_samples,
            "iterations": self.iterations,
            "bounds": list(self.bounds),
            "at_bound": self.at_bound,
            "candidates_selected_at": 1.0,
            "candidates_exact_up_to": None
            if self.exact_up_to is None
            else ("inf" if math.isinf(self.exact_up_to) else self.exact_up_to),
            "sweep": [asdict(p) for p in self.sweep],
        }


def nll_fit_set(
    pool: CandidatePool, point: OperatingPoint, *, matching: Matching = "greedy"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The NLL fit set at ``T = 1``: logits ``[u, K]``, targets ``[u]`` (-1: background), objectness or None."""
    import torch

    records, cand = detections_at(pool, 1.0, point, matching=matching)
    logits = torch.cat([i.logits for i in pool.images]) if pool.images else torch.zeros(0, pool.num_classes)
    # Each candidate's row in ``logits`` (sigmoid pools keep rows only above their row threshold).
    rows_of, offset = [], 0
    for image in pool.images:
        own = image.row_of if image.row_of is not None else torch.arange(image.boxes.shape[0])
        rows_of.append(torch.where(own >= 0, own + offset, own))
        offset += image.logits.shape[0]
    row_index = torch.cat(rows_of) if rows_of else torch.zeros(0, dtype=torch.int64)
    has_obj = any(i.objectness is not None for i in pool.images)
    obj = torch.cat([i.objectness for i in pool.images if i.objectness is not None]) if has_obj else None
    scored = records.status >= 0
    target: dict[int, tuple[float, int]] = {}
    for c, s, label, status in zip(
        cand[scored].tolist(),
        records.scores[scored].tolist(),
        records.labels[scored].tolist(),
        records.status[scored].tolist(),
        strict=True,
    ):
        best = target.get(c, (-1.0, -1))
        if status == 1 and s > best[0]:
            target[c] = (s, label)
        elif c not in target:
            target[c] = (-1.0, -1)
    chosen = torch.tensor(sorted(target), dtype=torch.int64)
    labels = torch.tensor([target[c][1] for c in sorted(target)], dtype=torch.int64)
    rows = row_index[chosen]
    if bool((rows < 0).any()):
        raise InvalidValueError(
            f"the candidate pool kept logit rows only above score {pool.row_threshold}; collect it with a "
            f"row_threshold <= the operating point's score_threshold {point.score_threshold}"
        )
    return logits[rows], labels, None if obj is None else obj[chosen]


def _newton(terms: Callable[[float], tuple[float, float]], lo: float, hi: float, tol: float) -> tuple[float, int]:
    """Safeguarded Newton on beta in [1/hi, 1/lo] for a convex objective; returns (T, steps)."""
    b_lo, b_hi = 1.0 / hi, 1.0 / lo
    a, b = b_lo, b_hi
    beta = min(max(1.0, b_lo), b_hi)
    steps = 0
    for _ in range(200):
        grad, curv = terms(beta)
        steps += 1
        if grad > 0:
            b = beta
        else:
            a = beta
        if (beta <= b_lo and grad >= 0) or (beta >= b_hi and grad <= 0):
            break
        new = beta - grad / curv if curv > 0 else math.nan
        if not (a < new < b):
            new = (a + b) / 2  # Newton left the bracket: bisect
        done = abs(1.0 / new - 1.0 / beta) < tol
        beta = new
        if done:
            break
    return 1.0 / beta, steps


def softmax_nll_temperature(
    logits: torch.Tensor, targets: torch.Tensor, *, bounds: tuple[float, float] = (0.05, 20.0), tol: float = 1e-9
) -> tuple[float, int]:
    """The T minimising ``mean[logsumexp(z / T) - z_y / T]`` (targets are column indices); returns (T, steps)."""
    import torch

    z = logits.to(torch.float64)
    zy = z.gather(1, targets.view(-1, 1)).squeeze(1)

    def terms(beta: float) -> tuple[float, float]:
        p = softmax_rows(beta * z)
        mean = (p * z).sum(dim=1)
        var = (p * z * z).sum(dim=1) - mean * mean
        return float((mean - zy).mean()), float(var.clamp(min=0).mean())

    return _newton(terms, *validate_bounds(bounds), tol)


def sigmoid_nll_temperature(
    logits: torch.Tensor, targets: torch.Tensor, *, bounds: tuple[float, float] = (0.05, 20.0), tol: float = 1e-9
) -> tuple[float, int]:
    """The T minimising ``mean[softplus(z / T) - y z / T]`` over all entries (``y`` 0/1); returns (T, steps)."""
    import torch

    z = logits.to(torch.float64)
    y = targets.to(torch.float64)

    def terms(beta: float) -> tuple[float, float]:
        s = torch.sigmoid(beta * z)
        return float((z * (s - y)).mean()), float((z * z * s * (1 - s)).mean())

    return _newton(terms, *validate_bounds(bounds), tol)


def _objectness_nll(z: torch.Tensor, y: torch.Tensor, o: torch.Tensor, t: float) -> float:
    import torch

    log_q = torch.nn.functional.logsigmoid(o)[:, None]
    log_p = log_q + torch.nn.functional.logsigmoid(z / t)
    log_not_p = torch.log1p(-torch.exp(log_p).clamp(max=1 - 1e-15))
    return float(-(y * log_p + (1 - y) * log_not_p).mean())


def _nll_fit(
    pool: CandidatePool, point: OperatingPoint, matching: Matching, lo: float, hi: float, tol: float
) -> tuple[float, int, int, float]:
    """(T, steps, samples, NLL at T) of the NLL fit."""
    import torch

    logits, labels, obj = nll_fit_set(pool, point, matching=matching)
    if labels.numel() == 0:
        raise InvalidValueError(
            "objective nll: no detections at the operating point to fit on; lower the score threshold"
        )
    if pool.head == "softmax":
        fg = labels + (1 if pool.background == "first" else 0)
        bg = 0 if pool.background == "first" else logits.shape[1] - 1
        cols = torch.where(labels >= 0, fg, torch.full_like(labels, bg))
        t, steps = softmax_nll_temperature(logits, cols, bounds=(lo, hi), tol=tol)
        z = logits.to(torch.float64) / t
        top = z.amax(dim=1)
        lse = (z - top[:, None]).exp().sum(dim=1).log() + top
        nll = float((lse - z.gather(1, cols.view(-1, 1)).squeeze(1)).mean())
        return t, steps, int(labels.numel()), nll
    y = torch.zeros_like(logits, dtype=torch.float64)
    tp = labels >= 0
    y[tp.nonzero().squeeze(1), labels[tp]] = 1.0
    if obj is None:
        t, steps = sigmoid_nll_temperature(logits, y, bounds=(lo, hi), tol=tol)
        z = logits.to(torch.float64) / t
        return t, steps, int(labels.numel()), float((torch.nn.functional.softplus(z) - y * z).mean())
    z, o = logits.to(torch.float64), obj.to(torch.float64)
    evals = 0

    def value(temp: float) -> float:
        nonlocal evals
        evals += 1
        return _objectness_nll(z, y, o, temp)

    t, nll = _golden(value, math.log(lo), math.log(hi), tol)
    return t, evals, int(labels.numel()), nll


def _grid(lo: float, hi: float, size: int) -> list[float]:
    step = (math.log(hi) - math.log(lo)) / (size - 1)
    temps = {math.exp(math.log(lo) + i * step) for i in range(size)}
    return sorted(temps | {t for t in (1.0, 1.5) if lo <= t <= hi})


def _point(
    pool: CandidatePool, t: float, point: OperatingPoint, matching: Matching, n_bins: int
) -> DetectionSweepPoint:
    import torch

    records, _ = detections_at(pool, t, point, matching=matching)
    scored = records.status >= 0
    conf = records.scores[scored]
    e = detection_calibration_error(conf, (records.status[scored] == 1).to(torch.float64), n_bins=n_bins)
    return DetectionSweepPoint(
        temperature=t,
        dece=e.dece,
        dece_over=e.over,
        dece_under=e.under,
        num_detections=int(records.status.numel()),
        num_tp=int((records.status == 1).sum()),
        num_fp=int((records.status == 0).sum()),
        confidence=float(conf.mean()) if conf.numel() else 0.0,
    )


def fit_detection_temperature(
    pool: CandidatePool,
    *,
    objective: DetectionObjective = "dece",
    temperature: float | None = None,
    operating_point: OperatingPoint | None = None,
    matching: Matching = "greedy",
    bounds: tuple[float, float] = (0.1, 10.0),
    grid: int = 32,
    n_bins: int = 20,
    tol: float = 1e-5,
) -> DetectionTemperatureFit:
    """Fit the temperature of a detection teacher's class logits on its candidate pool.

    Args:
        pool: The candidates of the validation images (:class:`CandidatePool`).
        objective: ``dece`` (default), ``nll`` or ``fixed``.
        temperature: The T for ``fixed`` (default 1.5); not allowed otherwise.
        operating_point: Where detections are cut (default :class:`OperatingPoint`).
        matching: ``greedy`` (COCO) or ``netcal``.
        bounds: The range of T searched.
        grid: Temperatures in the sweep (log-spaced over ``bounds``, plus 1 and 1.5).
        n_bins: Confidence bins of D-ECE.
        tol: Tolerance on T (``nll`` Newton runs to ``min(tol, 1e-9)``).

    Returns:
        A :class:`DetectionTemperatureFit`.

    Raises:
        InvalidValueError: an unknown objective, bad bounds or temperature, or nothing to fit on.
    """
    point = operating_point or OperatingPoint()
    lo, hi = validate_bounds(bounds)
    if objective not in DETECTION_OBJECTIVES:
        raise InvalidValueError(f"objective: expected one of {', '.join(DETECTION_OBJECTIVES)}, got {objective!r}")
    if temperature is not None and objective != "fixed":
        raise InvalidValueError("a temperature is given only with objective='fixed'")
    if grid < 2:
        raise InvalidValueError(f"grid must be at least 2 temperatures, got {grid}")
    cache: dict[float, DetectionSweepPoint] = {}

    def at(t: float) -> DetectionSweepPoint:
        if t not in cache:
            cache[t] = _point(pool, t, point, matching, n_bins)
        return cache[t]

    temps = _grid(lo, hi, grid)
    sweep = tuple(at(t) for t in temps)
    samples = 0
    value: float | None
    if objective == "fixed":
        t = validate_temperature(1.5 if temperature is None else temperature)
        value, iterations = None, 0
    elif objective == "nll":
        t, iterations, samples, value = _nll_fit(pool, point, matching, lo, hi, min(tol, 1e-9))
    else:
        values = [p.dece for p in sweep]
        last = len(temps) - 1
        minima = [
            i
            for i in range(len(temps))
            if (i == 0 or values[i] <= values[i - 1]) and (i == last or values[i] <= values[i + 1])
        ]
        minima.sort(key=lambda i: (values[i], abs(math.log(temps[i]))))
        t, value = temps[minima[0]], values[minima[0]]
        for i in minima[:_STARTS]:
            cand, v = _golden(
                lambda x: at(x).dece, math.log(temps[max(i - 1, 0)]), math.log(temps[min(i + 1, last)]), tol
            )
            if v < value:
                t, value = cand, v
        iterations = len(cache)
    at_bound = objective != "fixed" and (abs(t - lo) <= 2 * tol * lo or abs(t - hi) <= 2 * tol * hi)
    return DetectionTemperatureFit(
        temperature=float(t),
        objective=objective,
        objective_value=value,
        head=pool.head,
        fit_samples=samples,
        iterations=iterations,
        bounds=(lo, hi),
        at_bound=at_bound,
        sweep=sweep,
        exact_up_to=pool.exact_up_to(point.score_threshold),
    )
