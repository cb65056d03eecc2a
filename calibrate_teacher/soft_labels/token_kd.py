r"""Sparse KD losses for token caches: the teacher's top-k plus one "rest" bucket.

A token cache keeps, per scored token, the teacher's k largest values :math:`v_i = z_i / T`
and the full-row log-sum-exp :math:`\ell`, so the kept probabilities
:math:`p_i = e^{v_i - \ell}` are exact and so is the tail mass
:math:`p_\text{rest} = 1 - \sum_i p_i` of the :math:`V - k` tokens not kept. How that tail is
spread over those tokens is unknown, so the losses compare the two distributions over
:math:`k + 1` buckets: the k kept tokens, and one bucket "every other token". The student's
buckets are its own probabilities :math:`q_i` of the same k tokens and
:math:`q_\text{rest} = \sum_{j \notin \text{top-}k} q_j` (a log-sum-exp over its other logits,
never :math:`1 - \sum q_i`, which cancels). For :math:`k = V` the rest bucket is empty and the
losses are the dense ones exactly. The bucketed divergence is a lower bound of the full-vocabulary
one (the data-processing inequality: merging outcomes never increases a divergence).

- ``forward_kl``: :math:`\mathrm{KL}(p \,\|\, q) = \sum_b p_b (\log p_b - \log q_b)` (what
  :func:`~calibrate_teacher.soft_labels.kd_loss` does for classification).
- ``reverse_kl``: :math:`\mathrm{KL}(q \,\|\, p)` (mode-seeking; MiniLLM).
- ``jsd``: the generalised Jensen-Shannon divergence of TRL's GKD
  (``trl.trainer.gkd_trainer.generalized_jsd_loss``): with the mixture
  :math:`m = (1 - \beta) q + \beta p`,
  :math:`\mathrm{JSD}_\beta = \beta \, \mathrm{KL}(p \,\|\, m) + (1 - \beta) \, \mathrm{KL}(q \,\|\, m)`,
  and, as TRL special-cases them, :math:`\beta = 0` is the forward KL and :math:`\beta = 1` the
  reverse KL.

The loss is the sum over scored tokens divided by their number (TRL's ``batchmean`` over the
completion mask). A teacher tail below 1e-30 (fp16 rounding can make :math:`1 - \sum p_i`
slightly negative) is floored at 1e-30 so the reverse KL stays finite. No extra KD temperature
is offered: the values are at the calibrated T, and the tail's log-sum-exp at another
temperature was not stored; export at the temperature you want instead.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

from calibrate_teacher.errors import InvalidValueError

if TYPE_CHECKING:
    import torch

    from calibrate_teacher.soft_labels.token_reader import TokenSoftLabels

__all__ = ["Divergence", "token_kd_loss"]

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
_TAIL_FLOOR = 1e-30


def token_kd_loss(
    student_logits: torch.Tensor,
    teacher: TokenSoftLabels,
    *,
    divergence: Divergence = "forward_kl",
    beta: float = 0.5,
) -> torch.Tensor:
    """Return the sparse KD loss of a batch: mean over the scored tokens.

    Args:
        student_logits: The student's raw logits ``[..., S, V]`` at the same positions as
            ``teacher`` (a causal LM: the logits at t, predicting token t + 1, as the cache).
        teacher: The cache's soft labels for the batch (:meth:`TokenSoftLabelCache.batch`),
            ``index``/``values`` ``[..., S, k]``, ``lse``/``mask`` ``[..., S]``.
        divergence: ``forward_kl``, ``reverse_kl`` or ``jsd``.
        beta: The JSD interpolation (TRL's ``beta``), in [0, 1].

    Returns:
        A scalar tensor (0 when no token is scored).

    Raises:
        InvalidValueError: shapes disagree, V differs, unknown divergence or beta outside [0, 1].

    >>> import torch
    >>> from calibrate_teacher.soft_labels.token_reader import TokenSoftLabels
    >>> t = TokenSoftLabels(index=torch.tensor([[[0, 1]]]), values=torch.zeros(1, 1, 2),
    ...     lse=torch.full((1, 1), math.log(2.0)), mask=torch.ones(1, 1, dtype=torch.bool),
    ...     labels=torch.zeros(1, 1, dtype=torch.int64), vocab_size=2)
    >>> float(token_kd_loss(torch.zeros(1, 1, 2), t))
    0.0
    """
    import torch

    if divergence not in ("forward_kl", "reverse_kl", "jsd"):
        raise InvalidValueError(f"token_kd_loss: divergence {divergence!r}; use forward_kl, reverse_kl or jsd")
    if not 0.0 <= beta <= 1.0:
        raise InvalidValueError(f"token_kd_loss: beta {beta!r} must lie in [0, 1]")
    s = student_logits
    if s.shape[:-1] != teacher.mask.shape or teacher.index.shape[:-1] != teacher.mask.shape:
        raise InvalidValueError(
            f"token_kd_loss: student logits {tuple(s.shape)} and teacher {tuple(teacher.index.shape)} "
            "must share the positions [..., S]"
        )
    if s.shape[-1] != teacher.vocab_size:
        raise InvalidValueError(
            f"token_kd_loss: student vocabulary {s.shape[-1]} differs from the teacher's {teacher.vocab_size}"
        )
    device = s.device
    mask = teacher.mask.to(device)
    if not bool(mask.any()):
        return s.sum() * 0.0
    # Only scored positions: [n, V] student rows, [n, k] teacher rows
    s = s[mask].float()
    index = teacher.index.to(device)[mask]
    t_log = (teacher.values.to(device)[mask] - teacher.lse.to(device)[mask].unsqueeze(-1)).float()
    k, vocab = int(index.shape[-1]), int(s.shape[-1])

    s_lse = torch.logsumexp(s, dim=-1, keepdim=True)
    s_log = s.gather(-1, index) - s_lse
    if k < vocab:
        others = s.scatter(-1, index, float("-inf"))
        s_rest = torch.logsumexp(others, dim=-1, keepdim=True) - s_lse
        kept = torch.exp(t_log.double()).sum(-1, keepdim=True)
        t_rest = torch.log(torch.clamp(1.0 - kept, min=_TAIL_FLOOR)).float()
        s_log = torch.cat([s_log, s_rest], dim=-1)
        t_log = torch.cat([t_log, t_rest], dim=-1)

    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
        per_token = _kl(t_log, s_log)
    elif divergence == "reverse_kl" or beta == 1.0:
        per_token = _kl(s_log, t_log)
    else:
        mix = torch.logsumexp(torch.stack([s_log + math.log1p(-beta), t_log + math.log(beta)]), dim=0)
        per_token = beta * _kl(t_log, mix) + (1.0 - beta) * _kl(s_log, mix)
    return per_token.sum() / per_token.shape[0]


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities; buckets with p = 0 contribute 0."""
    import torch

    p = torch.exp(log_p)
    terms = p * (log_p - log_q)
    return torch.where(p > 0, terms, torch.zeros_like(terms)).sum(-1)
