"""Streaming passes over a logit (or probability) matrix.

Row chunks and class columns for the metrics, and the row-max-shifted float32 copy that the
temperature search sweeps.

Everything here works in chunks, so memory beyond the input stays ``O(chunk x C)`` (rows) or
``O(N x block)`` (class columns, which ACE needs sorted over all samples).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: Elements per row chunk: small enough to stay in a CPU's cache across in-place operations.
CHUNK_ELEMENTS = 1 << 16
#: Elements per column block of ACE/TACE (each sorted along N): bounds memory at ~200 MB.
COLUMN_ELEMENTS = 1 << 22


def rows_per_chunk(num_classes: int) -> int:
    """Rows per chunk for a matrix of ``num_classes`` columns."""
    return max(1, CHUNK_ELEMENTS // num_classes)


Chunk = tuple["torch.Tensor", "torch.Tensor", "torch.Tensor | None"]


def logit_rows(logits: torch.Tensor, temperature: float) -> Iterator[Chunk]:
    """Yield ``(log_probs, probs, logsumexp)`` float64 row chunks of ``softmax(logits / T)``."""
    import torch

    step = rows_per_chunk(logits.shape[1])
    for start in range(0, logits.shape[0], step):
        z = logits[start : start + step].to(torch.float64) / temperature
        lse = torch.logsumexp(z, dim=1, keepdim=True)
        log_p = z - lse
        yield log_p, safe_exp(log_p), lse.squeeze(1)


def row_logsumexp(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Each row's float64 ``logsumexp(logits / T)`` ``[N]``: the ``lse`` of :func:`logit_rows`, alone."""
    import torch

    step = rows_per_chunk(logits.shape[1])
    return torch.cat([
        torch.logsumexp(logits[start : start + step].to(torch.float64) / temperature, dim=1)
        for start in range(0, logits.shape[0], step)
    ])


def safe_exp(log_p: torch.Tensor) -> torch.Tensor:
    """``exp`` with inputs floored at -708, below which float64 results are subnormal.

    Subnormals are ~50x slower on x86 CPUs, and probabilities under 1e-307 change no sum.
    """
    return log_p.clamp(min=-708.0).exp()


def prob_rows(probs: torch.Tensor) -> Iterator[Chunk]:
    """Yield ``(log_probs, probs, None)`` float64 row chunks of a probability matrix."""
    import torch

    tiny = torch.finfo(torch.float64).tiny
    step = rows_per_chunk(probs.shape[1])
    for start in range(0, probs.shape[0], step):
        p = probs[start : start + step].to(torch.float64)
        yield p.clamp_min(tiny).log(), p, None


def prob_columns(probs: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(first_class, p[:, cols].T)`` float64 column blocks ``[cols, N]``."""
    import torch

    step = max(1, COLUMN_ELEMENTS // probs.shape[0])
    for start in range(0, probs.shape[1], step):
        yield start, probs[:, start : start + step].to(torch.float64).T.contiguous()


def logit_columns(
    logits: torch.Tensor, temperature: float, lse: torch.Tensor
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(first_class, softmax(logits / T)[:, cols].T)`` float64 blocks, given each row's ``lse``."""
    import torch

    step = max(1, COLUMN_ELEMENTS // logits.shape[0])
    for start in range(0, logits.shape[1], step):
        z = logits[:, start : start + step].to(torch.float64) / temperature
        yield start, safe_exp(z - lse[:, None]).T.contiguous()


class ShiftedLogits:
    """Logits shifted by their row maximum (float32) and what every pass needs.

    Passes run over cache-sized row chunks with in-place operations on one buffer: on a CPU this
    is about twice as fast as one ``torch.logsumexp`` over the whole matrix.
    """

    def __init__(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        import torch

        work = torch.float64 if logits.dtype == torch.float64 else torch.float32
        z = logits.to(work)
        # One reduction gives both: max's indices resolve ties to the first index, as argmax does.
        top, pred = z.max(dim=1, keepdim=True)
        self.shifted = z - top  # row max is exactly 0
        self.labels = labels.to(device=z.device, dtype=torch.int64)
        self.label_logit = self.shifted.gather(1, self.labels[:, None]).squeeze(1).to(torch.float64)
        self.correct = (pred.squeeze(1) == self.labels).to(torch.float64)
        self.n = z.shape[0]
        self.step = max(1, CHUNK_ELEMENTS // z.shape[1])
        self._buffer = torch.empty(self.step * z.shape[1], dtype=work, device=z.device)
        # exp() of inputs below this gives subnormals, which are 50x slower on x86 CPUs;
        # the terms are < 1e-37 of the row's largest term (1), so flooring them changes no sum.
        self._floor = -87.0 if work == torch.float32 else -708.0

    def _chunks(self, rows: torch.Tensor) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        for start in range(0, rows.shape[0], self.step):
            z = rows[start : start + self.step]
            yield start, z, self._buffer[: z.numel()].view_as(z)

    def newton_terms(self, beta: float, stride: int = 1) -> tuple[float, float]:
        """Gradient and curvature of the mean NLL in ``beta`` (one pass; every ``stride``-th row)."""
        import torch

        rows = self.shifted[::stride] if stride > 1 else self.shifted
        label_logit = self.label_logit[::stride] if stride > 1 else self.label_logit
        m1s, m2s = [], []
        for _, z, buf in self._chunks(rows):
            torch.mul(z, beta, out=buf)
            buf.clamp_min_(self._floor).exp_()
            s = buf.sum(dim=1)
            buf.mul_(z)
            m1 = buf.sum(dim=1) / s
            buf.mul_(z)
            m1s.append(m1)
            m2s.append(buf.sum(dim=1) / s)
        m1 = torch.cat(m1s).to(torch.float64)
        m2 = torch.cat(m2s).to(torch.float64)
        count = rows.shape[0]
        grad = float((m1 - label_logit).sum()) / count
        curv = float((m2 - m1 * m1).clamp_min(0).sum()) / count
        return grad, curv

    def confidence(self, temperature: float) -> torch.Tensor:
        """Top-label confidence per row at ``temperature`` (float64; the top class has e = 1)."""
        import torch

        sums = []
        for _, z, buf in self._chunks(self.shifted):
            torch.mul(z, 1.0 / temperature, out=buf)
            buf.clamp_min_(self._floor).exp_()
            sums.append(buf.sum(dim=1))
        return 1.0 / torch.cat(sums).to(torch.float64)
