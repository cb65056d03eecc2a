"""Vectorised, seeded bootstrap percentile intervals for ECE and ACE."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: Resamples drawn at once; bounds the ``[block, N]`` index matrix.
_BLOCK_ELEMENTS = 1 << 22


def _weights(n: int, resamples: int, seed: int, device: torch.device) -> torch.Tensor:
    """Multinomial resampling counts ``[resamples, n]`` (float64), drawn from one seeded stream."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = torch.empty((resamples, n), dtype=torch.float64)
    block = max(1, _BLOCK_ELEMENTS // n)
    for start in range(0, resamples, block):
        rows = min(block, resamples - start)
        idx = torch.randint(n, (rows, n), generator=gen)
        offsets = torch.arange(rows)[:, None] * n
        out[start : start + rows] = (
            torch.bincount((idx + offsets).flatten(), minlength=rows * n).view(rows, n).to(torch.float64)
        )
    return out.to(device)


def _interval(values: torch.Tensor) -> tuple[float, float]:
    import torch

    q = torch.quantile(values, torch.tensor([0.025, 0.975], dtype=values.dtype, device=values.device))
    return float(q[0]), float(q[1])


def bootstrap_ece(
    bins: torch.Tensor,
    conf: torch.Tensor,
    correct: torch.Tensor,
    n_bins: int,
    resamples: int,
    seed: int,
) -> tuple[float, float]:
    """95% interval of the top-label ECE; equal-width bins are fixed, so each resample is exact."""
    import torch

    n = conf.shape[0]
    w = _weights(n, resamples, seed, conf.device)  # [B, N]
    onehot = torch.zeros((n, n_bins), dtype=torch.float64, device=conf.device)
    onehot[torch.arange(n, device=conf.device), bins] = 1.0
    gap = (conf - correct)[:, None] * onehot  # [N, M]
    ece = (w @ gap).abs().sum(dim=1) / w.sum(dim=1)
    return _interval(ece)


class AceBootstrap:
    """Accumulates the 95% interval of ACE over class blocks, during ACE's own column pass.

    Each class's equal-mass bins are held at their full-sample edges: recomputing them would sort
    all ``N x C`` probabilities once per resample. Holding them turns a resample into one matrix
    product over the class block (``B x N x C x M`` multiply-adds in all), and nothing per class is
    kept after its block.
    """

    def __init__(self, n: int, resamples: int, seed: int, device: torch.device) -> None:
        import torch

        self.n = n
        self.weights = _weights(n, resamples, seed, device).to(torch.float32)  # [B, N]
        self.total = torch.zeros(resamples, dtype=torch.float64, device=device)
        self.classes = 0
        self._spread: torch.Tensor | None = None

    def add(self, sorted_values: torch.Tensor, sorted_hits: torch.Tensor, order: torch.Tensor,
            count: torch.Tensor) -> None:
        """Add a block of classes: rows sorted by value, ``order`` maps back, ``count`` per bin."""
        import torch

        k, n = sorted_values.shape
        m = count.shape[1]
        device = sorted_values.device
        # The bin of each sorted position, from the bin sizes: mark each bin's start, then cumsum.
        marks = torch.zeros((k, n + 1), dtype=torch.int64, device=device)
        starts = count.to(torch.int64).cumsum(dim=1)[:, :-1]
        marks.scatter_add_(1, starts, torch.ones_like(starts))
        bins = marks[:, :n].cumsum(dim=1)
        rows = torch.arange(k, device=device)[:, None]
        flat = ((rows * m + bins) * n + order).view(-1)
        size = k * m * n
        if self._spread is None or self._spread.numel() < size:
            self._spread = torch.zeros(size, dtype=torch.float32, device=device)
        spread = self._spread[:size]
        spread.scatter_(0, flat, (sorted_hits - sorted_values).to(torch.float32).view(-1))
        sums = self.weights @ spread.view(k * m, n).T  # [B, k*m]
        spread.scatter_(0, flat, torch.zeros_like(spread[: flat.numel()]))  # zero again for reuse
        self.total += sums.view(-1, k, m).abs().sum(dim=2).sum(dim=1).to(torch.float64)
        self.classes += k

    def interval(self) -> tuple[float, float]:
        """The 2.5 % and 97.5 % percentiles of ACE over the resamples."""
        import torch

        ace = self.total / (self.classes * self.weights.sum(dim=1).to(torch.float64))
        return _interval(ace)
