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


def bootstrap_ace(
    edges: list[tuple[int, torch.Tensor, torch.Tensor]],
    labels: torch.Tensor,
    resamples: int,
    seed: int,
) -> tuple[float, float]:
    """95% interval of ACE with each class's equal-mass edges held at their full-sample values.

    Recomputing the edges would sort all ``N x C`` probabilities once per resample; holding them
    fixed turns each resample into one matrix product, ``B x N x C x M`` work in all.
    """
    import torch

    first = edges[0][1]
    n, device = first.shape[1], first.device
    w = _weights(n, resamples, seed, device).to(torch.float32)
    total = torch.zeros(resamples, dtype=torch.float64, device=device)
    classes = 0
    for start, block, upper in edges:
        k, m = block.shape[0], upper.shape[1] + 1
        cls = torch.arange(start, start + k, device=device)
        bins = torch.searchsorted(upper.contiguous(), block.contiguous(), right=False)  # [k, N]
        gap = (labels[None, :] == cls[:, None]).to(torch.float64) - block  # [k, N]
        spread = torch.zeros((k, m, n), dtype=torch.float32, device=device)
        spread.scatter_(1, bins[:, None, :], gap[:, None, :].to(torch.float32))
        sums = w @ spread.view(k * m, n).T  # [B, k*m]
        total += sums.view(resamples, k, m).abs().sum(dim=2).sum(dim=1).to(torch.float64)
        classes += k
    ace = total / (classes * w.sum(dim=1).to(torch.float64))
    return _interval(ace)
