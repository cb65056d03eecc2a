"""Sequence teachers (causal LMs, token classifiers): token-level metrics and temperature fits.

Every metric and fit runs over the **scored tokens** of the data (``attention_mask = 1`` and
label != -100; a causal LM's position t is scored against token t + 1, see ``_positions``), and
never holds a ``[tokens, V]`` matrix: a causal LM's final hidden states are stored once and its
head's logits recomputed chunk by chunk on every pass (``_store``).
"""

from __future__ import annotations

from calibrate_teacher.tokens._positions import IGNORE_INDEX, ScoredPositions, Task, scored_positions, shifted_targets
from calibrate_teacher.tokens.fit import TokenFit, TokenPasses, fit_token_temperature
from calibrate_teacher.tokens.metrics import TOKEN_DEFINITIONS, TokenMetrics, TokenMetricsAccumulator, token_metrics
from calibrate_teacher.tokens.teacher import LmHead, TokenTeacher, load_token_teacher

__all__ = [
    "IGNORE_INDEX",
    "TOKEN_DEFINITIONS",
    "LmHead",
    "ScoredPositions",
    "Task",
    "TokenFit",
    "TokenMetrics",
    "TokenMetricsAccumulator",
    "TokenPasses",
    "TokenTeacher",
    "fit_token_temperature",
    "load_token_teacher",
    "scored_positions",
    "shifted_targets",
    "token_metrics",
]
