r"""Calibration metrics of a classifier, computed in chunks with float64 accumulation.

Definitions (``N`` samples, ``C`` classes, ``M`` bins, ``p_ik`` the probability of class ``k``
for sample ``i``, ``conf_i = max_k p_ik`` and ``correct_i = [argmax_k p_ik = y_i]``):

- **accuracy** = mean of ``correct_i``.
- **nll** = mean of ``-log p_{i,y_i}``. **brier** = mean of ``sum_k (p_ik - [k = y_i])^2``
  (summed over classes, not divided by ``C``).
- **ece** (Guo et al. 2017) = ``sum_m |B_m|/N * |acc(B_m) - conf(B_m)|`` over equal-width bins
  of the top-label confidence. **ece_over** = ``sum_m |B_m|/N * max(conf - acc, 0)`` and
  **ece_under** = ``sum_m |B_m|/N * max(acc - conf, 0)``, so ``ece = ece_over + ece_under``.
- **mce** = ``max_m |acc(B_m) - conf(B_m)|`` over non-empty equal-width bins.
- **adaece** (Mukhoti et al. 2020) = the ECE formula over equal-mass bins of the top-label
  confidence.
- **ace** (Nixon et al. 2019) = ``1/C sum_k sum_r |B_rk|/N * |acc(B_rk) - conf(B_rk)|`` over
  equal-mass bins of each class's probabilities ``p_ik`` (all samples, class-conditional,
  L1), where ``acc(B_rk)`` is the fraction of samples in the bin whose label is ``k``. With
  ``N`` divisible by ``M`` this is Nixon's ``1/(CM) sum_k sum_r |acc - conf|``.
- **tace** = ACE over only the probabilities above 0.01 (``|B_rk|`` divided by the number kept
  for class ``k``); classes with none above it are left out of the mean.
- **classwise_ece** (Kull et al. 2019) = ``1/C sum_k sum_m |B_mk|/N * |acc(B_mk) - conf(B_mk)|``
  over equal-width bins of each class's probabilities.

Bins: equal-width bins are ``(lo, hi]`` with ``0`` in the first bin (as netcal, Guo et al. and
uncertainty-calibration; torchmetrics uses ``[lo, hi)``). Equal-mass bins are groups of
``ceil(n/M)`` sorted values with boundaries halfway between groups, ties to the lower bin (as
uncertainty-calibration's ``get_equal_bins``). Other libraries mean three different things by
"ACE"; :data:`DEFINITIONS` (also in every JSON report) says which one each key is.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from calibrate_teacher import _binning, _passes
from calibrate_teacher._passes import logit_columns, logit_rows, prob_columns, prob_rows
from calibrate_teacher.errors import InvalidValueError

if TYPE_CHECKING:
    import torch

    from calibrate_teacher._bootstrap import AceBootstrap

__all__ = [
    "DEFINITIONS",
    "BinStats",
    "CalibrationMetrics",
    "adaptive_calibration_error",
    "calibration_metrics",
    "calibration_metrics_from_probs",
    "classwise_calibration_error",
    "expected_calibration_error",
]

TACE_THRESHOLD = 0.01

DEFINITIONS: dict[str, str] = {
    "accuracy": "fraction of samples whose top-1 prediction equals the label",
    "nll": "mean negative log-likelihood of the label, -log p_y",
    "brier": "mean over samples of sum_k (p_k - onehot_k)^2 (summed over classes)",
    "ece": "top-label ECE, equal-width bins (lo, hi], sum_m |B_m|/N |acc - conf| (Guo et al. 2017)",
    "ece_over": "sum_m |B_m|/N max(conf - acc, 0): the overconfident part of ece",
    "ece_under": "sum_m |B_m|/N max(acc - conf, 0): the underconfident part of ece",
    "mce": "max over non-empty equal-width bins of |acc - conf| (top-label)",
    "adaece": "top-label ECE over equal-mass bins (AdaECE, Mukhoti et al. 2020)",
    "ace": "adaptive calibration error (Nixon et al. 2019): all classes, class-conditional, "
    "equal-mass bins, L1, no threshold, 1/C sum_k sum_r |B_rk|/N |acc - conf|",
    "tace": "thresholded ACE: as ace over probabilities > 0.01 only",
    "classwise_ece": "classwise ECE (Kull et al. 2019): 1/C sum_k of the equal-width-bin ECE "
    "of class k's probabilities",
    "bins": "equal-width bins are (lo, hi] with 0 in the first; equal-mass bins are groups of "
    "ceil(n/M) sorted values split halfway between groups, ties to the lower bin",
}


@dataclass(frozen=True)
class BinStats:
    """One equal-width bin of the top-label reliability table.

    Attributes:
        lower: The bin's lower edge (exclusive, except 0).
        upper: The bin's upper edge (inclusive).
        count: Samples whose confidence falls in the bin.
        confidence: Their mean confidence (0 when empty).
        accuracy: Their accuracy (0 when empty).
        gap: ``confidence - accuracy``; positive means overconfident.
    """

    lower: float
    upper: float
    count: int
    confidence: float
    accuracy: float
    gap: float


@dataclass(frozen=True)
class CalibrationMetrics:
    """Every metric of one model at one temperature (definitions in :data:`DEFINITIONS`).

    Attributes:
        confidence_intervals: metric name -> (low, high) 95% bootstrap percentile interval.
    """

    num_samples: int
    num_classes: int
    n_bins: int
    temperature: float | None
    accuracy: float
    confidence: float
    nll: float
    brier: float
    ece: float
    ece_over: float
    ece_under: float
    mce: float
    adaece: float
    ace: float
    tace: float
    classwise_ece: float
    bins: tuple[BinStats, ...]
    confidence_intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    bootstrap: int = 0

    @property
    def verdict(self) -> str:
        """``overconfident`` or ``underconfident``: which side of the ECE dominates."""
        return "overconfident" if self.ece_over > self.ece_under else "underconfident"

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict (bins as a list of dicts, intervals as [low, high])."""
        data = asdict(self)
        data["bins"] = [asdict(b) for b in self.bins]
        data["confidence_intervals"] = {k: list(v) for k, v in self.confidence_intervals.items()}
        data["verdict"] = self.verdict
        return data


def calibration_metrics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    n_bins: int = 15,
    bootstrap: int = 0,
    seed: int = 0,
) -> CalibrationMetrics:
    """Compute every calibration metric of ``softmax(logits / temperature)``.

    Args:
        logits: ``[N, C]`` float tensor (any float dtype, CPU or CUDA); never probabilities.
        labels: ``[N]`` integer labels in ``[0, C)``.
        temperature: Divide the logits by this before the softmax.
        n_bins: Number of bins ``M`` for every binned metric.
        bootstrap: Resamples for 95% percentile intervals of ECE and ACE (0: none).
        seed: Seed of the bootstrap resampling.

    Returns:
        The metrics, the per-bin table, and intervals when asked.

    Raises:
        InvalidValueError: bad shapes, NaN/Inf logits, labels out of range, bad options.

    Example:
        >>> import torch
        >>> m = calibration_metrics(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
        >>> round(m.accuracy, 3), round(m.ece, 4)  # (|1 - 0.8808| + |0 - 0.7311|) / 2
        (0.5, 0.4251)
    """
    from calibrate_teacher.logits import validate_logits

    validate_logits(logits, labels)
    _check_options(n_bins=n_bins, bootstrap=bootstrap)
    if not (math.isfinite(temperature) and temperature > 0):
        raise InvalidValueError(f"temperature must be a finite number > 0, got {temperature}")
    return _compute(logit_rows(logits, temperature), logits, labels, n_bins, bootstrap, seed,
                    temperature=temperature)


def calibration_metrics_from_probs(
    probs: torch.Tensor, labels: torch.Tensor, *, n_bins: int = 15, bootstrap: int = 0, seed: int = 0
) -> CalibrationMetrics:
    """Compute every calibration metric from probabilities (rows in [0, 1] summing to 1).

    Args:
        probs: ``[N, C]`` probabilities; never logits (they are refused, not guessed).
        labels: ``[N]`` integer labels in ``[0, C)``.
        n_bins: Number of bins ``M``.
        bootstrap: Resamples for 95% intervals of ECE and ACE (0: none).
        seed: Seed of the bootstrap resampling.

    Raises:
        InvalidValueError: bad shapes, values outside [0, 1], rows that do not sum to 1.
    """
    _validate_probs(probs, labels)
    _check_options(n_bins=n_bins, bootstrap=bootstrap)
    return _compute(prob_rows(probs), probs, labels, n_bins, bootstrap, seed, temperature=None)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, *, n_bins: int = 15) -> float:
    """Top-label ECE over equal-width bins ``(lo, hi]``.

    Example (bins (0, .5] and (.5, 1]: {0.5 right} and {0.9 right, 0.8 wrong, 0.7 right, 0.6 wrong},
    so ECE = 1/5 * |1 - 0.5| + 4/5 * |0.5 - 0.75| = 0.3):
        >>> import torch
        >>> p = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.5, 0.5]])
        >>> round(expected_calibration_error(p, torch.tensor([0, 1, 1, 1, 0]), n_bins=2), 6)
        0.3
    """
    return calibration_metrics_from_probs(probs, labels, n_bins=n_bins).ece


def adaptive_calibration_error(
    probs: torch.Tensor, labels: torch.Tensor, *, n_bins: int = 15, threshold: float | None = None
) -> float:
    """ACE (Nixon et al. 2019); with ``threshold`` the thresholded variant (TACE uses 0.01).

    Example:
        >>> import torch
        >>> p = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
        >>> round(adaptive_calibration_error(p, torch.tensor([0, 1, 1, 1]), n_bins=2), 6)
        0.4
    """
    import torch

    _validate_probs(probs, labels)
    _check_options(n_bins=n_bins, bootstrap=0)
    if threshold is None or threshold == TACE_THRESHOLD:
        ace, tace = _class_equal_mass(prob_columns(probs), labels, n_bins)
        return ace if threshold is None else tace
    values = probs.to(torch.float64).T.contiguous()
    hits = (labels[None, :] == torch.arange(probs.shape[1])[:, None]).to(torch.float64)
    _, value_sum, hit_sum, kept, _ = _binning.equal_mass_bins(values, hits, n_bins, threshold=threshold)
    err = (hit_sum - value_sum).abs().sum(dim=1) / kept.clamp_min(1)
    present = kept > 0
    return float(err[present].sum()) / max(int(present.sum()), 1)


def adaptive_calibration_error_of_logits(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, n_bins: int
) -> float:
    """ACE of ``softmax(logits / temperature)`` without materialising all the probabilities."""
    import torch

    lse = torch.cat([chunk[2] for chunk in logit_rows(logits, temperature) if chunk[2] is not None])
    return _class_equal_mass(logit_columns(logits, temperature, lse), labels, n_bins)[0]


def classwise_calibration_error(probs: torch.Tensor, labels: torch.Tensor, *, n_bins: int = 15) -> float:
    """Classwise ECE (Kull et al. 2019) over equal-width bins of each class's probabilities."""
    return calibration_metrics_from_probs(probs, labels, n_bins=n_bins).classwise_ece


# --- internals ---------------------------------------------------------------------------


def _check_options(*, n_bins: int, bootstrap: int) -> None:
    if not isinstance(n_bins, int) or n_bins < 1:
        raise InvalidValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")
    if not isinstance(bootstrap, int) or bootstrap < 0:
        raise InvalidValueError(f"bootstrap must be an integer >= 0, got {bootstrap!r}")


def _validate_probs(probs: torch.Tensor, labels: torch.Tensor) -> None:
    import torch

    from calibrate_teacher.logits import validate_logits

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


def _class_equal_mass(
    columns: Iterator[tuple[int, torch.Tensor]],
    labels: torch.Tensor,
    n_bins: int,
    bootstrap: AceBootstrap | None = None,
) -> tuple[float, float]:
    """ACE and TACE (one sort of each class column serves both, and the ACE bootstrap too)."""
    import torch

    sums = {"ace": 0.0, "tace": 0.0}
    used = {"ace": 0, "tace": 0}
    for start, block in columns:
        classes = torch.arange(start, start + block.shape[0], device=block.device)
        hits = (labels.to(block.device)[None, :] == classes[:, None]).to(torch.float64)
        sorted_values, sorted_hits, order = _binning.sort_rows(block, hits)
        for name, threshold in (("ace", None), ("tace", TACE_THRESHOLD)):
            first = _binning.first_above(sorted_values, threshold)
            count, value_sum, hit_sum, kept, _ = _binning.equal_mass_sorted(
                sorted_values, sorted_hits, n_bins, first=first
            )
            err = (hit_sum - value_sum).abs().sum(dim=1) / kept.clamp_min(1)
            present = kept > 0
            sums[name] += float(err[present].sum())
            used[name] += int(present.sum())
            if bootstrap is not None and threshold is None:
                bootstrap.add(sorted_values, sorted_hits, order, count)
    ace, tace = (sums[k] / used[k] if used[k] else 0.0 for k in ("ace", "tace"))
    return ace, tace


def _compute(
    chunks: Iterator[_passes.Chunk],
    source: torch.Tensor,
    labels: torch.Tensor,
    n_bins: int,
    bootstrap: int,
    seed: int,
    *,
    temperature: float | None,
) -> CalibrationMetrics:
    import torch

    n, c = source.shape
    device = source.device
    edges = _binning.inner_edges(n_bins, device=device)
    labels = labels.to(device=device, dtype=torch.int64)
    def zeros(*size: int) -> torch.Tensor:
        return torch.zeros(size, dtype=torch.float64, device=device)

    confs, corrects, lses = [], [], []
    nll = brier = zeros()
    # Classwise bins: entries above the first edge are scattered; bin 0 is the remainder.
    cw_count = zeros(c * n_bins)
    cw_conf = zeros(c * n_bins)
    cw_hits = zeros(c * n_bins)
    col_conf = zeros(c)
    start = 0
    for log_p, p, lse in chunks:
        y = labels[start : start + p.shape[0]]
        conf, pred = p.max(dim=1)
        confs.append(conf)
        corrects.append((pred == y).to(torch.float64))
        p_y = p.gather(1, y[:, None]).squeeze(1)
        nll = nll - log_p.gather(1, y[:, None]).sum()
        brier = brier + ((p * p).sum(dim=1) - 2 * p_y + 1).sum()
        if lse is not None:
            lses.append(lse)  # O(N): lets ACE rebuild class columns without another softmax
        col_conf += p.sum(dim=0)
        upper0 = 1.0 / n_bins
        rows, cols = (p > upper0).nonzero(as_tuple=True)
        if rows.numel():
            vals = p[rows, cols]
            flat = cols * n_bins + _binning.equal_width_index(vals, edges)
            cw_count.index_add_(0, flat, torch.ones_like(vals))
            cw_conf.index_add_(0, flat, vals)
            cw_hits.index_add_(0, flat, (y[rows] == cols).to(torch.float64))
        start += p.shape[0]
    conf = torch.cat(confs)
    correct = torch.cat(corrects)

    # Top-label, equal-width.
    top_bin = _binning.equal_width_index(conf, edges)
    b_count = torch.bincount(top_bin, minlength=n_bins).to(torch.float64)
    b_conf = zeros(n_bins).index_add_(0, top_bin, conf)
    b_hits = zeros(n_bins).index_add_(0, top_bin, correct)
    diff = b_conf - b_hits  # positive: overconfident
    ece_over = float(diff.clamp_min(0).sum()) / n
    ece_under = float((-diff).clamp_min(0).sum()) / n
    nonempty = b_count > 0
    gaps = (diff[nonempty] / b_count[nonempty]).abs()
    mce = float(gaps.max()) if gaps.numel() else 0.0

    # Classwise, equal-width: fill bin 0 from the class totals.
    cw_count = cw_count.view(c, n_bins)
    cw_conf = cw_conf.view(c, n_bins)
    cw_hits = cw_hits.view(c, n_bins)
    class_hits = torch.bincount(labels, minlength=c).to(torch.float64)
    cw_count[:, 0] = n - cw_count[:, 1:].sum(dim=1)
    cw_conf[:, 0] = col_conf - cw_conf[:, 1:].sum(dim=1)
    cw_hits[:, 0] = class_hits - cw_hits[:, 1:].sum(dim=1)
    classwise = float((cw_hits - cw_conf).abs().sum()) / (n * c)

    # Top-label, equal-mass.
    _, ada_conf, ada_hits, _, _ = _binning.equal_mass_bins(conf[None, :], correct[None, :], n_bins)
    adaece = float((ada_hits - ada_conf).abs().sum()) / n

    # Class-conditional, equal-mass (ACE, TACE).
    def columns() -> Iterator[tuple[int, torch.Tensor]]:
        if temperature is None:
            return prob_columns(source)
        return logit_columns(source, temperature, torch.cat(lses))

    from calibrate_teacher._bootstrap import AceBootstrap, bootstrap_ece

    ace_boot = AceBootstrap(n, bootstrap, seed, device) if bootstrap else None
    ace, tace = _class_equal_mass(columns(), labels, n_bins, ace_boot)

    intervals: dict[str, tuple[float, float]] = {}
    if bootstrap:
        intervals["ece"] = bootstrap_ece(top_bin, conf, correct, n_bins, bootstrap, seed)
    if ace_boot is not None:
        intervals["ace"] = ace_boot.interval()

    lower = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    safe = b_count.clamp_min(1)
    bins = tuple(
        BinStats(
            lower=float(lower[m]),
            upper=float(lower[m + 1]),
            count=int(b_count[m]),
            confidence=float(b_conf[m] / safe[m]),
            accuracy=float(b_hits[m] / safe[m]),
            gap=float(diff[m] / safe[m]),
        )
        for m in range(n_bins)
    )
    return CalibrationMetrics(
        num_samples=n,
        num_classes=c,
        n_bins=n_bins,
        temperature=temperature,
        accuracy=float(correct.sum()) / n,
        confidence=float(conf.sum()) / n,
        nll=float(nll) / n,
        brier=float(brier) / n,
        ece=ece_over + ece_under,
        ece_over=ece_over,
        ece_under=ece_under,
        mce=mce,
        adaece=adaece,
        ace=ace,
        tace=tace,
        classwise_ece=classwise,
        bins=bins,
        confidence_intervals=intervals,
        bootstrap=bootstrap,
    )
