"""Scored positions of a batch of sequences, and the causal shift (written here, and only here).

A position is **scored** when its ``attention_mask`` is 1 and its target is not -100. Labels
arrive unshifted (as Hugging Face's ``labels=`` and :func:`~calibrate_teacher.data.tokens`
give them: for a causal LM ``labels == input_ids`` where scored, -100 elsewhere):

- ``token-classification``: position ``t`` is scored against ``labels[t]``.
- ``causal-lm``: position ``t`` predicts the next token, so it is scored against
  ``labels[t + 1]``; the last position of every row has no target. This is the shift of
  transformers' ``ForCausalLMLoss`` (``labels[..., 1:]`` against ``logits[..., :-1, :]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from calibrate_teacher.errors import InputError

if TYPE_CHECKING:
    import torch

Task = Literal["causal-lm", "token-classification"]
TASKS: tuple[str, ...] = ("causal-lm", "token-classification")
#: The label of a position that is not scored (PyTorch's and transformers' ignore_index).
IGNORE_INDEX = -100


@dataclass(frozen=True)
class ScoredPositions:
    """Which positions of a ``[B, S]`` batch are scored, and against what.

    Attributes:
        mask: bool ``[B, S]``: True where position ``t`` is scored.
        targets: int64 ``[B, S]``: the target of each position (-100 where not scored), already
            shifted for a causal LM.
        rows: int64 ``[n]``: the batch row of each scored position, in row-major order.
    """

    mask: torch.Tensor
    targets: torch.Tensor
    rows: torch.Tensor

    @property
    def count(self) -> int:
        """The number of scored positions."""
        return int(self.rows.shape[0])

    def scored_targets(self) -> torch.Tensor:
        """int64 ``[n]``: the targets of the scored positions, row-major (as ``x[mask]`` orders them)."""
        return self.targets[self.mask]


def shifted_targets(labels: torch.Tensor, *, task: Task) -> torch.Tensor:
    """The target of each position ``[B, S]``: ``labels`` itself, or shifted left by one for a causal LM.

    Example:
        >>> import torch
        >>> shifted_targets(torch.tensor([[5, 6, 7, -100]]), task="causal-lm").tolist()
        [[6, 7, -100, -100]]
    """
    import torch

    if task == "token-classification":
        return labels.to(torch.int64)
    out = torch.full_like(labels, IGNORE_INDEX, dtype=torch.int64)
    out[:, :-1] = labels[:, 1:]
    return out


def scored_positions(
    attention_mask: torch.Tensor | None, labels: torch.Tensor, *, task: Task, vocab_size: int | None = None
) -> ScoredPositions:
    """Find the scored positions of a batch: ``attention_mask == 1`` and target != -100.

    Args:
        attention_mask: int or bool ``[B, S]`` (None: every position attends).
        labels: int64 ``[B, S]``, unshifted, -100 where a position is not scored.
        task: ``causal-lm`` (position t is scored against token t + 1) or ``token-classification``.
        vocab_size: When given, scored targets must lie in ``[0, vocab_size)``.

    Returns:
        The mask, the (shifted) targets and the row of each scored position.

    Raises:
        InputError: labels not ``[B, S]``, a mask of another shape, or targets out of range.

    Example (the last row's padding and the final position of each row are not scored):
        >>> import torch
        >>> labels = torch.tensor([[1, 2, 3], [4, 5, -100]])
        >>> mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
        >>> s = scored_positions(mask, labels, task="causal-lm")
        >>> s.mask.tolist(), s.scored_targets().tolist(), s.rows.tolist()
        ([[True, True, False], [True, False, False]], [2, 3, 5], [0, 0, 1])
    """
    import torch

    if labels.ndim != 2:
        raise InputError(
            f"token labels: expected [batch, sequence] int64 labels (-100 where not scored), got shape "
            f"{tuple(labels.shape)}; yield one label per token"
        )
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(labels.shape):
        raise InputError(
            f"attention_mask: shape {tuple(attention_mask.shape)} differs from the labels' "
            f"{tuple(labels.shape)}; give one mask entry per token"
        )
    targets = shifted_targets(labels.to(torch.int64), task=task)
    mask = targets != IGNORE_INDEX
    if attention_mask is not None:
        mask &= attention_mask.to(device=targets.device) != 0
    scored = targets[mask]
    if scored.numel() and (int(scored.min()) < 0 or (vocab_size is not None and int(scored.max()) >= vocab_size)):
        bad = int(scored.min()) if int(scored.min()) < 0 else int(scored.max())
        limit = "" if vocab_size is None else f" [0, {vocab_size})"
        raise InputError(
            f"token labels: target {bad} is outside the teacher's vocabulary{limit}; use -100 for "
            "positions that are not scored"
        )
    rows = mask.nonzero(as_tuple=True)[0]
    return ScoredPositions(mask=mask, targets=targets, rows=rows)
