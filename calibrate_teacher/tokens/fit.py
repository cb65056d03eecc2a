"""Temperature fit over scored tokens at vocabulary scale: the searches of ``temperature.py``, streamed.

:class:`TokenPasses` gives the fit what :class:`~calibrate_teacher._passes.ShiftedLogits` gives
it for a ``[N, C]`` matrix (``newton_terms``, ``confidence``, ``label_logit``, ``correct``), but
each pass recomputes the logits chunk by chunk from a :class:`~calibrate_teacher.tokens._store.ScoredLogits`
(``head(h)`` from stored hidden states, stored logits, or a teacher re-run), so memory stays
``O(chunk x V + N)``. The searches themselves are ``temperature.py``'s, unchanged:

- ``nll``: exact, safeguarded Newton on ``beta = 1/T`` (``_search._fit_nll``); each step is one
  pass computing ``sum[lse(beta z) - beta z_y]``'s derivative ``E_p[z] - z_y`` and second
  derivative ``Var_p(z)`` per token, as ``ShiftedLogits`` does: logits shifted by their row
  maximum, exponentials and row sums in float32 (torch's cascade sum; a float64 row sum costs
  18x more on a CPU), ratios and the sums over tokens in float64. The first steps run on a
  strided subsample of the tokens.
- ``ece``, ``adaece``, ``paper``: the grid (log-spaced over ``bounds``, always with T = 1 and
  T = 1.5) computed in **one** pass for all its temperatures, then golden section on ``log T``
  around the deepest minima (one pass per evaluation). ``ace`` only where ``V <= 1000``.
- ``fixed``: a given ``T`` (default 1.5).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, cast

from calibrate_teacher._validate import validate_bounds, validate_temperature
from calibrate_teacher.errors import InvalidValueError
from calibrate_teacher.temperature import (
    OBJECTIVES,
    PAPER_DEFAULT_T,
    PAPER_GRID,
    PAPER_RANGE,
    SweepPoint,
    _grid,
    _point,
    paper_block,
    paper_position,
)
from calibrate_teacher.tokens._store import SMALL_VOCAB
from calibrate_teacher.tokens.metrics import TOKEN_DEFINITIONS, TokenMetrics, token_metrics

if TYPE_CHECKING:
    from collections.abc import Iterable

    import torch

    from calibrate_teacher._passes import ShiftedLogits
    from calibrate_teacher.temperature import Objective
    from calibrate_teacher.tokens._store import ScoredLogits

__all__ = ["TokenFit", "TokenPasses", "fit_token_temperature"]

#: exp() floor of float32 inputs (below it results are subnormal, 50x slower on x86; terms < 1e-37).
_FLOOR = -87.0


class TokenPasses:
    """Streaming passes over scored tokens' logits, shaped like ``ShiftedLogits`` for ``_search``.

    Attributes:
        n: Scored tokens.
        labels: int64 targets ``[N]``.
        label_logit: float64 ``z_y - max_c z_c`` per token ``[N]``.
        correct: float64 1/0 top-1 correctness per token ``[N]``.
        passes: Passes run over all the tokens so far (strided ones count their fraction).
    """

    def __init__(self, scored: ScoredLogits) -> None:
        """One pass to find each token's top logit, its correctness and its target's shifted logit."""
        import torch

        self.scored = scored
        self.labels = scored.targets
        label_logit, correct = [], []
        for z, y in scored.chunks():
            top, pred = z.max(dim=1, keepdim=True)
            label_logit.append((z.gather(1, y[:, None]) - top).squeeze(1).to(torch.float64))
            correct.append((pred.squeeze(1) == y).to(torch.float64))
        self.label_logit = torch.cat(label_logit)
        self.correct = torch.cat(correct)
        self.n = int(self.label_logit.shape[0])
        self.passes = 1.0
        self._confidence: dict[float, torch.Tensor] = {}

    @property
    def shifted(self) -> torch.Tensor:
        """The stored ``[N, V]`` logits (``ace`` only; ``V <= 1000``).

        Raises:
            InvalidValueError: the logits are not stored (large ``V``).
        """
        if self.scored.kind != "logits":
            raise InvalidValueError(
                f"objective 'ace' needs every class's probabilities: only for V <= {SMALL_VOCAB} (here "
                f"{self.scored.vocab_size:,}); use ece, adaece or nll"
            )
        return self.scored.logits_tensor()  # type: ignore[attr-defined, no-any-return]

    def _shifted_chunks(self, stride: int = 1) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """Each chunk shifted by its row maximum, with a work buffer of its shape (both reused)."""
        import torch

        self.passes += 1.0 / stride
        buffer: torch.Tensor | None = None
        for z, _ in self.scored.chunks(stride=stride):
            if buffer is None or buffer.numel() < z.numel():
                buffer = torch.empty(z.numel(), dtype=z.dtype, device=z.device)
            yield z.sub_(z.max(dim=1, keepdim=True).values), buffer[: z.numel()].view_as(z)

    def newton_terms(self, beta: float, stride: int = 1) -> tuple[float, float]:
        """Gradient ``mean(E_p[z] - z_y)`` and curvature ``mean(Var_p z)`` of the mean NLL in ``beta``."""
        import torch

        m1s, m2s = [], []
        for z, e in self._shifted_chunks(stride):
            torch.mul(z, beta, out=e).clamp_min_(_FLOOR).exp_()
            s = e.sum(dim=1).double()
            e.mul_(z)
            m1 = e.sum(dim=1).double() / s
            e.mul_(z)
            m2s.append(e.sum(dim=1).double() / s)
            m1s.append(m1)
        m1, m2 = torch.cat(m1s), torch.cat(m2s)
        label_logit = self.label_logit[::stride] if stride > 1 else self.label_logit
        count = m1.shape[0]
        return float((m1 - label_logit).sum()) / count, float((m2 - m1 * m1).clamp_min(0).sum()) / count

    def prefetch(self, temperatures: Iterable[float]) -> None:
        """Compute the per-token confidence at several temperatures in one pass (kept for :meth:`confidence`)."""
        import torch

        temps = [t for t in dict.fromkeys(temperatures) if t not in self._confidence]
        if not temps:
            return
        sums: dict[float, list[torch.Tensor]] = {t: [] for t in temps}
        for z, work in self._shifted_chunks():
            for t in temps:
                torch.mul(z, 1.0 / t, out=work)
                sums[t].append(work.clamp_min_(_FLOOR).exp_().sum(dim=1).double())
        for t in temps:
            self._confidence[t] = 1.0 / torch.cat(sums[t])

    def forget(self) -> None:
        """Drop the prefetched confidences (``O(N)`` floats each)."""
        self._confidence.clear()

    def confidence(self, temperature: float) -> torch.Tensor:
        """Top-label confidence per token at ``temperature`` (float64; one pass unless prefetched)."""
        if temperature not in self._confidence:
            self.prefetch([temperature])
            return self._confidence.pop(temperature)
        return self._confidence[temperature]


@dataclass(frozen=True)
class TokenFit:
    """The chosen temperature over scored tokens, how it was found, and the teacher before and after.

    Attributes:
        temperature: The chosen ``T``.
        objective: What was minimised (``fixed`` for a given ``T``).
        objective_value: The objective at ``T`` (None for ``fixed``).
        iterations: Newton steps or objective evaluations.
        passes: Passes over all the scored tokens spent on the search (subsample passes as fractions).
        bounds: The range of ``T`` searched.
        at_bound: True when ``T`` sits on a bound.
        before: Metrics at ``T = 1``.
        after: Metrics at ``T``.
        sweep: Top-label metrics over the grid.
        search_seconds: Wall time of the search alone (no reports, no sweep).
    """

    temperature: float
    objective: str
    objective_value: float | None
    iterations: int
    passes: float
    bounds: tuple[float, float]
    at_bound: bool
    before: TokenMetrics
    after: TokenMetrics
    sweep: tuple[SweepPoint, ...]
    search_seconds: float = 0.0

    @property
    def verdict(self) -> str:
        """Whether the teacher ends ``overconfident`` or ``underconfident`` at ``T``."""
        return self.after.verdict

    @property
    def paper_range(self) -> str:
        """Where ``T`` sits relative to the paper's 1.5-3.0: below, within, above."""
        return paper_position(self.temperature)

    def to_json(self) -> dict[str, object]:
        """The JSON report, keyed as :meth:`~calibrate_teacher.TemperatureFit.to_json`, plus ``unit: token``."""
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
            "search_seconds": self.search_seconds,
            "unit": "token",
            "before": self.before.to_json(),
            "after": self.after.to_json(),
            "sweep": [asdict(p) for p in self.sweep],
            "definitions": dict(TOKEN_DEFINITIONS),
        }


def fit_token_temperature(
    scored: ScoredLogits,
    *,
    objective: Objective = "ece",
    temperature: float | None = None,
    bounds: tuple[float, float] = (0.05, 20.0),
    n_bins: int = 15,
    grid: int = 32,
    tol: float = 1e-5,
    before: TokenMetrics | None = None,
    num_sequences: int | None = None,
) -> TokenFit:
    """Fit the temperature of scored tokens' logits without holding ``[tokens, V]``.

    Args:
        scored: The scored tokens (a store from the inference pass).
        objective: ``nll`` (exact), ``ece``, ``adaece``, ``ace`` (V <= 1000), ``paper`` or ``fixed``.
        temperature: The ``T`` for ``fixed`` (default 1.5); not allowed otherwise.
        bounds: The range of ``T`` searched.
        n_bins: Bins for the binned metrics.
        grid: Temperatures in the sweep (log-spaced over ``bounds``, plus 1 and 1.5; all in one
            pass; 32 by default, half ``fit_temperature``'s 64, as each costs an exp per logit).
        tol: Tolerance on ``T`` (``nll``) or on ``log T`` (the searches' refinement).
        before: The metrics at T = 1 when already measured (the inference pass gives them).
        num_sequences: Sequences in the data, for the reports.

    Returns:
        A :class:`TokenFit` with before/after metrics and the sweep.

    Raises:
        InvalidValueError: unknown objective, bad bounds/grid/temperature, ``ace`` for large ``V``.
    """
    from calibrate_teacher._search import _fit_nll, _search

    lo, hi = validate_bounds(bounds)
    if objective not in OBJECTIVES:
        raise InvalidValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if grid < 2:
        raise InvalidValueError(f"grid must be at least 2 temperatures, got {grid}")
    if temperature is not None and objective != "fixed":
        raise InvalidValueError("a temperature is given only with objective='fixed'")
    if objective == "ace" and scored.kind != "logits":
        raise InvalidValueError(
            f"objective 'ace' needs every class's probabilities: only for V <= {SMALL_VOCAB} (here "
            f"{scored.vocab_size:,}); use ece, adaece or nll"
        )
    import time

    from calibrate_teacher.tokens._malloc import fix_mmap_threshold

    fix_mmap_threshold()  # else freed chunks stay resident (see _malloc)
    start = time.perf_counter()
    passes = TokenPasses(scored)
    shifted = cast("ShiftedLogits", passes)  # duck-typed: the searches use only what TokenPasses has
    temps = _grid(lo, hi, grid)
    value: float | None
    if objective == "fixed":
        t = validate_temperature(PAPER_DEFAULT_T if temperature is None else temperature)
        value, iterations = None, 0
    elif objective == "nll":
        t, iterations, _ = _fit_nll(shifted, lo, hi, tol)
        value = None
    else:
        passes.prefetch(temps + (_grid(*PAPER_RANGE, PAPER_GRID) if objective == "paper" else []))
        points = tuple(_point(shifted, x, n_bins) for x in temps)
        if objective == "paper":
            t, value, iterations = _paper(shifted, points, lo, hi, n_bins, tol)
        else:
            t, value, iterations, _ = _search(shifted, objective, points, lo, hi, n_bins, tol)
        passes.forget()
    search_seconds = time.perf_counter() - start
    passes.prefetch([*temps, t])
    sweep = tuple(_point(shifted, x, n_bins) for x in temps)
    if objective == "nll":
        value = _point(shifted, t, n_bins).nll
    search_passes = passes.passes
    at_bound = objective not in ("fixed", "paper") and (abs(t - lo) <= 2 * tol * lo or abs(t - hi) <= 2 * tol * hi)
    before = before or token_metrics(scored, temperature=1.0, n_bins=n_bins, num_sequences=num_sequences)
    after = token_metrics(scored, temperature=t, n_bins=n_bins, num_sequences=num_sequences or before.num_sequences)
    return TokenFit(
        temperature=t, objective=objective, objective_value=value, iterations=iterations, passes=search_passes,
        bounds=(lo, hi), at_bound=at_bound, before=before, after=after, sweep=sweep, search_seconds=search_seconds,
    )


def _paper(
    shifted: ShiftedLogits, points: tuple[SweepPoint, ...], lo: float, hi: float, n_bins: int, tol: float
) -> tuple[float, float, int]:
    """``temperature._search_paper`` with the range's grid prefetched: ECE within the paper's 1.5-3.0."""
    from calibrate_teacher._search import _search

    p_lo, p_hi = PAPER_RANGE
    inside = {p.temperature: p for p in points if p_lo <= p.temperature <= p_hi}
    for x in _grid(p_lo, p_hi, PAPER_GRID):
        inside.setdefault(x, _point(shifted, x, n_bins))
    paper_points = tuple(inside[x] for x in sorted(inside))
    t, value, iterations, _ = _search(shifted, "ece", paper_points, p_lo, p_hi, n_bins, tol)
    t_all, v_all, it_all, _ = _search(shifted, "ece", points, lo, hi, n_bins, tol)
    if p_lo <= t_all <= p_hi and v_all < value:
        t, value = t_all, v_all
    return t, value, iterations + it_all
