"""The two binning schemes behind every calibration metric (see ``metrics`` for the definitions).

Equal-width bins: ``M`` bins with edges ``e_m = m / M``; a value ``p`` is in bin ``m`` (0-based)
when ``e_m < p <= e_{m+1}``, and ``p = 0`` is in bin 0.

Equal-mass bins: sort the ``n`` values, cut them into consecutive groups of ``ceil(n / M)``
values (the last group may be smaller, so there can be fewer than ``M`` groups), put each
boundary halfway between the last value of one group and the first of the next, and give each
value to the first bin whose upper boundary is >= it (ties go to the lower bin). This is the
scheme of verified_calibration's ``get_equal_bins``; it depends only on the values, so the
result does not change when samples are permuted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class EqualWidthBins:
    """Equal-width bins of one row of values: per-bin sums ``[M]`` (float64) and each value's bin ``[n]``."""

    count: torch.Tensor
    value_sum: torch.Tensor
    hit_sum: torch.Tensor
    index: torch.Tensor


def inner_edges(n_bins: int, *, device: torch.device | str = "cpu") -> torch.Tensor:
    """The ``n_bins - 1`` interior edges of equal-width bins on [0, 1], float64."""
    import torch

    return torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64, device=device)[1:-1]


def equal_width_index(values: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Bin index of each value for equal-width bins ``(lo, hi]`` (0 goes to bin 0)."""
    import torch

    return torch.bucketize(values, edges, right=False)


def equal_width_bins(values: torch.Tensor, hits: torch.Tensor, n_bins: int) -> EqualWidthBins:
    """Equal-width binning of ``values`` ``[n]`` (float64 in [0, 1]) with 0/1 outcomes ``hits`` ``[n]``."""
    import torch

    index = equal_width_index(values, inner_edges(n_bins, device=values.device))
    count = torch.bincount(index, minlength=n_bins).to(torch.float64)
    zeros = torch.zeros(n_bins, dtype=torch.float64, device=values.device)
    return EqualWidthBins(count, zeros.index_add(0, index, values), zeros.index_add(0, index, hits), index)


class ClasswiseBins:
    """Equal-width bins of every class's probabilities ``[C, M]``, accumulated over row chunks.

    Only entries above the first bin's upper edge ``1/M`` are scattered (most of a wide softmax
    lies below it); bin 0 is filled from the class totals at the end.
    """

    def __init__(self, num_classes: int, n_bins: int, *, device: torch.device) -> None:
        import torch

        self.shape = (num_classes, n_bins)
        self.edges = inner_edges(n_bins, device=device)
        self.value_sum = torch.zeros(num_classes * n_bins, dtype=torch.float64, device=device)
        self.hit_sum = torch.zeros_like(self.value_sum)
        self.column_sum = torch.zeros(num_classes, dtype=torch.float64, device=device)

    def add(self, p: torch.Tensor, y: torch.Tensor) -> None:
        """Add a float64 chunk of probabilities ``p`` ``[n, C]`` with its int64 labels ``y`` ``[n]``."""
        import torch

        self.column_sum += p.sum(dim=0)
        rows, cols = (p > 1.0 / self.shape[1]).nonzero(as_tuple=True)
        if rows.numel():
            vals = p[rows, cols]
            flat = cols * self.shape[1] + equal_width_index(vals, self.edges)
            self.value_sum.index_add_(0, flat, vals)
            self.hit_sum.index_add_(0, flat, (y[rows] == cols).to(torch.float64))

    def sums(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per class and bin, the sums of probabilities and of hits ``[C, M]``, given all labels ``[N]``."""
        import torch

        value_sum, hit_sum = self.value_sum.view(self.shape), self.hit_sum.view(self.shape)
        class_hits = torch.bincount(labels, minlength=self.shape[0]).to(torch.float64)
        value_sum[:, 0] = self.column_sum - value_sum[:, 1:].sum(dim=1)
        hit_sum[:, 0] = class_hits - hit_sum[:, 1:].sum(dim=1)
        return value_sum, hit_sum


def equal_mass_bins(
    values: torch.Tensor, hits: torch.Tensor, n_bins: int, *, threshold: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Equal-mass binning of each row of ``values`` ``[K, n]`` with outcomes ``hits`` ``[K, n]``.

    Args:
        values: float64 probabilities, one binning problem per row.
        hits: float64 0/1 outcomes aligned with ``values``.
        n_bins: The number of bins ``M`` (groups of ``ceil(m / M)`` values).
        threshold: Keep only values strictly above it (TACE); None keeps all (ACE, AdaECE).

    Returns:
        ``(count, value_sum, hit_sum, kept, upper)``: per-bin counts and sums ``[K, M]``, the
        number of values kept per row ``[K]``, and the upper edges of the first ``M - 1`` bins
        ``[K, M - 1]`` (2.0 where a bin lies past the last group). Bins past the last group are
        empty.
    """
    sorted_values, sorted_hits, _ = sort_rows(values, hits)
    return equal_mass_sorted(sorted_values, sorted_hits, n_bins, first=first_above(sorted_values, threshold))


def sort_rows(values: torch.Tensor, hits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort each row of ``values`` ascending, carry ``hits`` along; also return the order."""
    import torch

    sorted_values, order = torch.sort(values, dim=1)
    return sorted_values.contiguous(), hits.gather(1, order), order


def first_above(sorted_values: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """Per row, the position of the first value strictly above ``threshold`` (0 for None)."""
    import torch

    k = sorted_values.shape[0]
    if threshold is None:
        return torch.zeros(k, dtype=torch.int64, device=sorted_values.device)
    probe = torch.full((k, 1), threshold, dtype=sorted_values.dtype, device=sorted_values.device)
    return torch.searchsorted(sorted_values, probe, right=True).squeeze(1)


def equal_mass_sorted(
    sorted_values: torch.Tensor, sorted_hits: torch.Tensor, n_bins: int, *, first: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`equal_mass_bins` on rows already sorted, binning positions ``first:`` of each row.

    Sorting once serves ACE (``first`` = 0) and TACE (``first`` past the threshold) alike.
    """
    import torch

    k, n = sorted_values.shape
    kept = n - first
    group = torch.div(kept + n_bins - 1, n_bins, rounding_mode="floor")
    j = torch.arange(1, n_bins, device=sorted_values.device)
    starts = first[:, None] + j[None, :] * group[:, None]
    valid = (j[None, :] * group[:, None]) < kept[:, None]
    above = sorted_values.gather(1, starts.clamp(0, n - 1))
    below = sorted_values.gather(1, (starts - 1).clamp(0, n - 1))
    edge = (below + above) / 2
    # Number of values <= each edge: ties with an edge stay in the lower bin.
    upto = torch.searchsorted(sorted_values, edge.contiguous(), right=True)
    upto = torch.where(valid, upto, torch.full_like(upto, n))
    bounds = torch.cat([first[:, None], upto, torch.full_like(first[:, None], n)], dim=1)
    # Prefix sums with a leading zero column, written in place (no concatenated copies).
    cum_v = torch.zeros((k, n + 1), dtype=torch.float64, device=sorted_values.device)
    cum_h = torch.zeros_like(cum_v)
    torch.cumsum(sorted_values, dim=1, out=cum_v[:, 1:])
    torch.cumsum(sorted_hits, dim=1, out=cum_h[:, 1:])
    lo, hi = bounds[:, :-1], bounds[:, 1:]
    count = (hi - lo).to(torch.float64)
    value_sum = cum_v.gather(1, hi) - cum_v.gather(1, lo)
    hit_sum = cum_h.gather(1, hi) - cum_h.gather(1, lo)
    upper = torch.where(valid, edge, torch.full_like(edge, 2.0))
    return count, value_sum, hit_sum, kept, upper
