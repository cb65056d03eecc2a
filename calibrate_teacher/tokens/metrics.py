r"""Token-level calibration metrics of a sequence teacher, streamed over logit chunks.

Every metric runs over the ``N`` **scored tokens** (``attention_mask = 1``, target != -100; a
causal LM's position t against token t + 1) as if each were one sample of
:mod:`calibrate_teacher.metrics`, with the same definitions and bins (equal-width ``(lo, hi]``,
0 in the first; equal-mass groups of ``ceil(n/M)``):

- **accuracy**, **confidence**, **nll** (per token), **perplexity** = ``exp(nll)``,
  **brier** = mean of ``sum_c p_c^2 - 2 p_y + 1`` (exactly ``sum_c (p_c - [c = y])^2``, chunk by chunk),
  **ece** with **ece_over** / **ece_under**, **mce**, **adaece** over all scored tokens.
- **sequence_ece** (per-sequence-averaged ECE): ``1/Q sum_q ECE_q``, where ``ECE_q`` is the
  top-label ECE of the scored tokens of sequence ``q`` alone (the same ``M`` equal-width bins,
  weights ``|B_m ∩ q| / N_q``) and ``Q`` is the number of sequences with at least one scored
  token: every sequence weighs the same, so long sequences do not dominate.
- **classwise_ece**, **ace**, **tace** only where ``V <= 1000`` (token classifiers); otherwise
  ``None``, and :attr:`TokenMetrics.not_computed` says why.

Memory: ``O(chunk x V)`` for the logits and ``O(N)`` floats for the per-token confidences
(AdaECE and the per-sequence ECE need them); never ``O(N x V)``. ACE/TACE for small ``V`` read
the stored ``[N, V]`` logits column block by column block, as :mod:`calibrate_teacher.metrics` does.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from calibrate_teacher import _binning
from calibrate_teacher._passes import logit_columns
from calibrate_teacher.metrics import (
    DEFINITIONS,
    TACE_THRESHOLD,
    BinStats,
    _bin_table,
    _class_equal_mass,
    adaece,
    ece_parts,
)
from calibrate_teacher.tokens._store import SMALL_VOCAB

if TYPE_CHECKING:
    import torch

    from calibrate_teacher.tokens._store import ScoredLogits

__all__ = ["TOKEN_DEFINITIONS", "TokenMetrics", "TokenMetricsAccumulator", "token_metrics"]

TOKEN_DEFINITIONS: dict[str, str] = {
    **DEFINITIONS,
    "unit": "every metric is over scored tokens (attention_mask = 1 and label != -100; a causal LM's "
    "position t is scored against token t + 1), each token one sample",
    "perplexity": "exp(nll): the per-token perplexity",
    "brier": "mean over tokens of sum_c p_c^2 - 2 p_y + 1 (= sum_c (p_c - onehot_c)^2), computed chunk-wise",
    "sequence_ece": "per-sequence-averaged ECE: 1/Q sum_q ECE_q, ECE_q the top-label ECE (same equal-width "
    "bins) of sequence q's scored tokens alone, Q the sequences with at least one scored token",
}


@dataclass(frozen=True)
class TokenMetrics:
    """Every token-level metric at one temperature (definitions in :data:`TOKEN_DEFINITIONS`).

    Attributes:
        not_computed: metric name -> why it is None (e.g. ``V = 32000 > 1000``).
    """

    num_tokens: int
    num_sequences: int
    vocab_size: int
    n_bins: int
    temperature: float
    accuracy: float
    confidence: float
    nll: float
    perplexity: float
    brier: float
    ece: float
    ece_over: float
    ece_under: float
    mce: float
    adaece: float
    sequence_ece: float
    classwise_ece: float | None
    ace: float | None
    tace: float | None
    bins: tuple[BinStats, ...]
    not_computed: dict[str, str] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        """``overconfident`` or ``underconfident``: which side of the ECE dominates."""
        return "overconfident" if self.ece_over > self.ece_under else "underconfident"

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict (``unit: token``; None metrics as null with their reason in ``not_computed``)."""
        data = asdict(self)
        data["bins"] = [asdict(b) for b in self.bins]
        data["verdict"] = self.verdict
        data["unit"] = "token"
        if math.isinf(self.perplexity):
            data["perplexity"] = None
        return data


class TokenMetricsAccumulator:
    """Streams float32 logit chunks ``[rows, V]`` of ``softmax(z / T)`` into the token metrics (float64 sums)."""

    def __init__(self, *, vocab_size: int, n_bins: int = 15, temperature: float = 1.0, device: str = "cpu") -> None:
        """Start empty sums for ``V`` classes on ``device``."""
        import torch

        self.vocab_size, self.n_bins, self.temperature = vocab_size, n_bins, float(temperature)
        self.device = device
        self._nll = torch.zeros((), dtype=torch.float64, device=device)
        self._brier = torch.zeros_like(self._nll)
        self._conf: list[torch.Tensor] = []
        self._correct: list[torch.Tensor] = []
        self._seq: list[torch.Tensor] = []
        self._lse: list[torch.Tensor] = []
        self._y: list[torch.Tensor] = []
        self._buffer: torch.Tensor | None = None
        small = vocab_size <= SMALL_VOCAB
        self._classwise = _binning.ClasswiseBins(vocab_size, n_bins, device=torch.device(device)) if small else None

    def add(self, z: torch.Tensor, y: torch.Tensor, sequences: torch.Tensor) -> None:
        """Add one chunk: logits ``z`` ``[rows, V]``, targets ``y`` and sequence ids ``[rows]``."""
        import torch

        if self._buffer is None or self._buffer.numel() < z.numel():
            self._buffer = torch.empty(z.numel(), dtype=torch.float64, device=self.device)
        z64 = self._buffer[: z.numel()].view(z.shape).copy_(z)  # one float64 buffer, reused
        y = y.to(device=self.device, dtype=torch.int64)
        if self.temperature != 1.0:
            z64.div_(self.temperature)
        lse = torch.logsumexp(z64, dim=1)
        log_p = z64.sub_(lse[:, None])
        log_p_y = log_p.gather(1, y[:, None]).squeeze(1)
        p = log_p.clamp_(min=-708.0).exp_()  # safe_exp, in place: log_p is not needed past here
        conf, pred = p.max(dim=1)
        p_y = log_p_y.exp()
        self._nll -= log_p_y.sum()
        self._brier += (torch.einsum("ij,ij->i", p, p) - 2 * p_y + 1).sum()
        self._conf.append(conf)
        self._correct.append((pred == y).to(torch.float64))
        self._seq.append(sequences.to(self.device))
        if self._classwise is not None:
            self._classwise.add(p, y)
            self._lse.append(lse)
            self._y.append(y)

    def result(self, *, num_sequences: int, logits: torch.Tensor | None = None) -> TokenMetrics:
        """The metrics of everything added; ``logits`` (the stored ``[N, V]``, V <= 1000) adds ACE/TACE."""
        import torch

        conf, correct = torch.cat(self._conf), torch.cat(self._correct)
        n = int(conf.shape[0])
        top = _binning.equal_width_bins(conf, correct, self.n_bins)
        over, under, mce = ece_parts(top)
        nll = float(self._nll) / n
        not_computed: dict[str, str] = {}
        classwise = ace = tace = None
        why = f"V = {self.vocab_size:,} > {SMALL_VOCAB}: class-conditional metrics need every class's bins"
        if self._classwise is not None:
            labels = torch.cat(self._y)
            value_sum, hit_sum = self._classwise.sums(labels)
            classwise = float((hit_sum - value_sum).abs().sum()) / (n * self.vocab_size)
            if logits is not None:
                columns = logit_columns(logits.to(self.device), self.temperature, torch.cat(self._lse))
                ace, tace = _class_equal_mass(columns, labels, self.n_bins, (None, TACE_THRESHOLD))
            else:
                why = "ACE/TACE need the stored logits of every scored token"
        if classwise is None:
            not_computed["classwise_ece"] = why
        if ace is None:
            not_computed["ace"] = not_computed["tace"] = why
        return TokenMetrics(
            num_tokens=n,
            num_sequences=num_sequences,
            vocab_size=self.vocab_size,
            n_bins=self.n_bins,
            temperature=self.temperature,
            accuracy=float(correct.sum()) / n,
            confidence=float(conf.sum()) / n,
            nll=nll,
            perplexity=math.exp(nll) if nll < 700 else math.inf,
            brier=float(self._brier) / n,
            ece=over + under,
            ece_over=over,
            ece_under=under,
            mce=mce,
            adaece=adaece(conf, correct, self.n_bins),
            sequence_ece=sequence_ece(conf, correct, torch.cat(self._seq), self.n_bins),
            classwise_ece=classwise,
            ace=ace,
            tace=tace,
            bins=_bin_table(top),
            not_computed=not_computed,
        )


def sequence_ece(conf: torch.Tensor, correct: torch.Tensor, sequences: torch.Tensor, n_bins: int) -> float:
    """Per-sequence-averaged ECE of per-token confidences ``[N]`` (see the module docstring).

    Example (sequence 0: one token, |0.9 - 1| = 0.1; sequence 1: bins (.5, 1] {0.8 wrong, 0.6 right},
    |0.7 - 0.5| = 0.2; mean 0.15):
        >>> import torch
        >>> c = torch.tensor([0.9, 0.8, 0.6], dtype=torch.float64)
        >>> round(sequence_ece(c, torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64), torch.tensor([0, 1, 1]), 2), 6)
        0.15
    """
    import torch

    ids, compact = torch.unique(sequences, return_inverse=True)
    index = _binning.equal_width_index(conf, _binning.inner_edges(n_bins, device=conf.device))
    flat = compact * n_bins + index
    size = int(ids.shape[0]) * n_bins
    zeros = torch.zeros(size, dtype=torch.float64, device=conf.device)
    gap = (zeros.index_add(0, flat, conf) - zeros.index_add(0, flat, correct)).abs().view(-1, n_bins).sum(dim=1)
    per_sequence = torch.bincount(compact, minlength=int(ids.shape[0])).to(torch.float64)
    return float((gap / per_sequence).mean())


def token_metrics(scored: ScoredLogits, *, temperature: float = 1.0, n_bins: int = 15,
                  num_sequences: int | None = None) -> TokenMetrics:
    """One pass over stored scored logits: every token metric of ``softmax(z / temperature)``.

    Args:
        scored: A token store (or a re-run source).
        temperature: Divide the logits by this.
        n_bins: Bins ``M``.
        num_sequences: Sequences in the data (default: those with a scored token).

    Returns:
        The metrics.
    """
    import torch

    acc = TokenMetricsAccumulator(vocab_size=scored.vocab_size, n_bins=n_bins, temperature=temperature,
                                  device=scored.device)
    seen = 0
    for z, y in scored.chunks():
        acc.add(z, y, scored.sequences[seen : seen + z.shape[0]])
        seen += z.shape[0]
    logits = None
    if scored.kind == "logits" and scored.vocab_size <= SMALL_VOCAB:
        logits = scored.logits_tensor()  # type: ignore[attr-defined]
    count = num_sequences if num_sequences is not None else int(torch.unique(scored.sequences).shape[0])
    return acc.result(num_sequences=count, logits=logits)
