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
from calibrate_teacher._validate import validate_logits, validate_options, validate_probs, validate_temperature

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

    def to_json(self) -> dict[str, object]:
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
    validate_logits(logits, labels)
    validate_options(n_bins=n_bins, bootstrap=bootstrap)
    t = validate_temperature(temperature)
    return compute_metrics(logits, labels, temperature=t, n_bins=n_bins, bootstrap=bootstrap, seed=seed)


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
    validate_probs(probs, labels)
    validate_options(n_bins=n_bins, bootstrap=bootstrap)
    return compute_metrics(probs, labels, temperature=None, n_bins=n_bins, bootstrap=bootstrap, seed=seed)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, *, n_bins: int = 15) -> float:
    """Top-label ECE over equal-width bins ``(lo, hi]``.

    Example (bins (0, .5] and (.5, 1]: {0.5 right} and {0.9 right, 0.8 wrong, 0.7 right, 0.6 wrong},
    so ECE = 1/5 * |1 - 0.5| + 4/5 * |0.5 - 0.75| = 0.3):
        >>> import torch
        >>> p = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.5, 0.5]])
        >>> round(expected_calibration_error(p, torch.tensor([0, 1, 1, 1, 0]), n_bins=2), 6)
        0.3
    """
    validate_probs(probs, labels)
    validate_options(n_bins=n_bins)
    rows = _scan_rows(prob_rows(probs), _int64(labels, probs), n_bins, top_only=True)
    over, under, _ = ece_parts(_binning.equal_width_bins(rows.conf, rows.correct, n_bins))
    return over + under


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
    validate_probs(probs, labels)
    validate_options(n_bins=n_bins)
    return _class_equal_mass(prob_columns(probs), _int64(labels, probs), n_bins, (threshold,))[0]


def classwise_calibration_error(probs: torch.Tensor, labels: torch.Tensor, *, n_bins: int = 15) -> float:
    """Classwise ECE (Kull et al. 2019) over equal-width bins of each class's probabilities."""
    validate_probs(probs, labels)
    validate_options(n_bins=n_bins)
    return _scan_rows(prob_rows(probs), _int64(labels, probs), n_bins).classwise_ece


# --- validated inputs: one pass over the rows, then the bins, then the reductions -------------
# The temperature search and the lazily computed reports of a fit call these directly, on
# inputs their public entry point has already validated.


def compute_metrics(
    source: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float | None,
    n_bins: int,
    bootstrap: int,
    seed: int,
) -> CalibrationMetrics:
    """Every metric of validated ``source``: logits divided by ``temperature``, or probabilities (None)."""
    from calibrate_teacher._bootstrap import AceBootstrap, bootstrap_ece

    n, c = source.shape
    y = _int64(labels, source)
    chunks = prob_rows(source) if temperature is None else logit_rows(source, temperature)
    rows = _scan_rows(chunks, y, n_bins)
    top = _binning.equal_width_bins(rows.conf, rows.correct, n_bins)
    ece_over, ece_under, mce = ece_parts(top)
    # Class columns, rebuilt from each row's logsumexp: no second softmax over the rows.
    lse = rows.lse
    columns = prob_columns(source) if temperature is None or lse is None else logit_columns(source, temperature, lse)
    ace_boot = AceBootstrap(n, bootstrap, seed, source.device) if bootstrap else None
    ace, tace = _class_equal_mass(columns, y, n_bins, (None, TACE_THRESHOLD), ace_boot)
    intervals: dict[str, tuple[float, float]] = {}
    if ace_boot is not None:
        intervals["ece"] = bootstrap_ece(top.index, rows.conf, rows.correct, n_bins, bootstrap, seed)
        intervals["ace"] = ace_boot.interval()
    return CalibrationMetrics(
        num_samples=n,
        num_classes=c,
        n_bins=n_bins,
        temperature=temperature,
        accuracy=float(rows.correct.sum()) / n,
        confidence=float(rows.conf.sum()) / n,
        nll=rows.nll,
        brier=rows.brier,
        ece=ece_over + ece_under,
        ece_over=ece_over,
        ece_under=ece_under,
        mce=mce,
        adaece=adaece(rows.conf, rows.correct, n_bins),
        ace=ace,
        tace=tace,
        classwise_ece=rows.classwise_ece,
        bins=_bin_table(top),
        confidence_intervals=intervals,
        bootstrap=bootstrap,
    )


def ece_parts(bins: _binning.EqualWidthBins) -> tuple[float, float, float]:
    """``(ece_over, ece_under, mce)`` of top-label equal-width bins (``ece`` is the first two summed)."""
    n = float(bins.count.sum())
    diff = bins.value_sum - bins.hit_sum  # positive: overconfident
    nonempty = bins.count > 0
    gaps = (diff[nonempty] / bins.count[nonempty]).abs()
    mce = float(gaps.max()) if gaps.numel() else 0.0
    return float(diff.clamp_min(0).sum()) / n, float((-diff).clamp_min(0).sum()) / n, mce


def adaece(conf: torch.Tensor, correct: torch.Tensor, n_bins: int) -> float:
    """AdaECE: the ECE formula over equal-mass bins of the top-label confidences ``conf`` ``[N]``."""
    _, value_sum, hit_sum, _, _ = _binning.equal_mass_bins(conf[None, :], correct[None, :], n_bins)
    return float((hit_sum - value_sum).abs().sum()) / conf.shape[0]


def adaptive_calibration_error_of_logits(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, n_bins: int
) -> float:
    """ACE of ``softmax(logits / temperature)`` without materialising all the probabilities."""
    lse = _passes.row_logsumexp(logits, temperature)
    columns = logit_columns(logits, temperature, lse)
    return _class_equal_mass(columns, _int64(labels, logits), n_bins, (None,))[0]


# --- internals ---------------------------------------------------------------------------


def _int64(labels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    import torch

    return labels.to(device=like.device, dtype=torch.int64)


@dataclass(frozen=True)
class _Rows:
    """What one pass over the row chunks gives: per-row top-label values (float64) and sums."""

    conf: torch.Tensor
    correct: torch.Tensor
    nll: float
    brier: float
    lse: torch.Tensor | None
    classwise_ece: float


def _scan_rows(chunks: Iterator[_passes.Chunk], labels: torch.Tensor, n_bins: int, *,
               top_only: bool = False) -> _Rows:
    """The one pass over the rows; ``top_only`` keeps just the top-label confidence and correctness."""
    import torch

    nll = torch.zeros((), dtype=torch.float64, device=labels.device)
    brier = torch.zeros_like(nll)
    confs, corrects, lses = [], [], []
    classwise: _binning.ClasswiseBins | None = None
    n = 0
    for log_p, p, lse in chunks:
        y = labels[n : n + p.shape[0]]
        n += p.shape[0]
        conf, pred = p.max(dim=1)
        confs.append(conf)
        corrects.append((pred == y).to(torch.float64))
        if top_only:
            continue
        p_y = p.gather(1, y[:, None]).squeeze(1)
        nll = nll - log_p.gather(1, y[:, None]).sum()
        brier = brier + ((p * p).sum(dim=1) - 2 * p_y + 1).sum()
        if lse is not None:
            lses.append(lse)  # O(N): lets ACE rebuild class columns without another softmax
        if classwise is None:
            classwise = _binning.ClasswiseBins(p.shape[1], n_bins, device=labels.device)
        classwise.add(p, y)
    classwise_ece = math.nan
    if classwise is not None:
        value_sum, hit_sum = classwise.sums(labels)
        classwise_ece = float((hit_sum - value_sum).abs().sum()) / (n * value_sum.shape[0])
    return _Rows(
        conf=torch.cat(confs),
        correct=torch.cat(corrects),
        nll=math.nan if top_only else float(nll) / n,
        brier=math.nan if top_only else float(brier) / n,
        lse=torch.cat(lses) if lses else None,
        classwise_ece=classwise_ece,
    )


def _class_equal_mass(
    columns: Iterator[tuple[int, torch.Tensor]],
    labels: torch.Tensor,
    n_bins: int,
    thresholds: tuple[float | None, ...],
    bootstrap: AceBootstrap | None = None,
) -> list[float]:
    """ACE at each threshold (None: none; TACE's is 0.01); one sort per class column serves all."""
    import torch

    sums = [0.0] * len(thresholds)
    used = [0] * len(thresholds)
    for start, block in columns:
        classes = torch.arange(start, start + block.shape[0], device=block.device)
        hits = (labels[None, :] == classes[:, None]).to(torch.float64)
        sorted_values, sorted_hits, order = _binning.sort_rows(block, hits)
        for i, threshold in enumerate(thresholds):
            first = _binning.first_above(sorted_values, threshold)
            count, value_sum, hit_sum, kept, _ = _binning.equal_mass_sorted(
                sorted_values, sorted_hits, n_bins, first=first
            )
            err = (hit_sum - value_sum).abs().sum(dim=1) / kept.clamp_min(1)
            present = kept > 0
            sums[i] += float(err[present].sum())
            used[i] += int(present.sum())
            if bootstrap is not None and threshold is None:
                bootstrap.add(sorted_values, sorted_hits, order, count)
    return [s / u if u else 0.0 for s, u in zip(sums, used, strict=True)]


def _bin_table(top: _binning.EqualWidthBins) -> tuple[BinStats, ...]:
    import torch

    n_bins = top.count.shape[0]
    lower = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    safe = top.count.clamp_min(1)
    diff = top.value_sum - top.hit_sum
    return tuple(
        BinStats(
            lower=float(lower[m]),
            upper=float(lower[m + 1]),
            count=int(top.count[m]),
            confidence=float(top.value_sum[m] / safe[m]),
            accuracy=float(top.hit_sum[m] / safe[m]),
            gap=float(diff[m] / safe[m]),
        )
        for m in range(n_bins)
    )
