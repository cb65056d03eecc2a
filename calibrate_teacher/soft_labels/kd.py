r"""Using a cache in a KD training loop: a dataset wrapper and the reference loss.

The cache stores the calibrated teacher logits :math:`z / T`. :func:`kd_loss` is Hinton et al.'s
loss on top of them, with a KD temperature :math:`\tau` applied to teacher *and* student:

.. math::

    L = \alpha \, \tau^2 \, \mathrm{KL}\big(\mathrm{softmax}(z / (T\tau)) \,\|\,
        \mathrm{softmax}(s / \tau)\big) + (1 - \alpha) \, \mathrm{CE}(s, y)

The :math:`\tau^2` factor keeps the gradient of the soft term on the scale of the hard term as
:math:`\tau` changes. With :math:`\tau = 1` the student learns from the teacher exactly as
calibrated; a trainer that divides by its own :math:`\tau` sees the teacher at :math:`T\tau`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from calibrate_teacher.errors import CacheError, InvalidValueError
from calibrate_teacher.soft_labels.reader import SoftLabelCache

if TYPE_CHECKING:
    import torch

__all__ = ["SoftLabelDataset", "kd_loss"]

Item = TypeVar("Item", covariant=True)
_T = TypeVar("_T", covariant=True)

if TYPE_CHECKING:
    from torch.utils.data import Dataset as _DatasetBase
else:  # torch is imported lazily; at run time a DataLoader only needs len() and [i]

    class _DatasetBase(Generic[_T]):
        pass


class IndexableDataset(Protocol[Item]):
    """Anything with ``len`` and ``[i]``: a map-style torch ``Dataset``, a list, a tuple..."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> Item: ...


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    tau: float = 1.0,
    alpha: float = 1.0,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Return the knowledge-distillation loss of a batch (mean over the batch).

    Args:
        student_logits: The student's raw logits ``[B, C]``.
        teacher_logits: The cached calibrated teacher logits ``z / T`` ``[B, C]`` (as
            :class:`SoftLabelDataset` or ``SoftLabelCache.logits()`` return them).
        tau: The KD temperature applied to both; the soft term is scaled by ``tau ** 2``.
        alpha: Weight of the soft term; ``1 - alpha`` weighs cross-entropy with ``labels``.
        labels: int64 class labels ``[B]`` (-1 is ignored); needed when ``alpha < 1``.

    Returns:
        A scalar tensor.

    Raises:
        InvalidValueError: shapes differ, ``tau <= 0``, ``alpha`` outside [0, 1], or labels missing.

    >>> import torch
    >>> float(kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), tau=4.0))
    0.0
    >>> one_hot = torch.tensor([[0.0, 1e4]])  # KL(one-hot || uniform) = log 2
    >>> round(float(kd_loss(torch.zeros(1, 2), one_hot)), 4)
    0.6931
    """
    import torch
    import torch.nn.functional as F

    if student_logits.ndim != 2 or student_logits.shape != teacher_logits.shape:
        raise InvalidValueError(
            f"kd_loss: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must both be [B, C]"
        )
    if not tau > 0:
        raise InvalidValueError(f"kd_loss: tau {tau!r} must be > 0")
    if not 0.0 <= alpha <= 1.0:
        raise InvalidValueError(f"kd_loss: alpha {alpha!r} must lie in [0, 1]")
    teacher = teacher_logits.to(device=student_logits.device, dtype=student_logits.dtype)
    log_student = F.log_softmax(student_logits / tau, dim=1)
    log_teacher = F.log_softmax(teacher / tau, dim=1)
    soft = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * tau**2
    if alpha == 1.0:
        return alpha * soft
    if labels is None:
        raise InvalidValueError("kd_loss: alpha < 1 weighs in cross-entropy, so labels are needed")
    hard = F.cross_entropy(
        student_logits, labels.to(student_logits.device, torch.int64), ignore_index=-1
    )
    return alpha * soft + (1.0 - alpha) * hard


class SoftLabelDataset(_DatasetBase[Any], Generic[Item]):
    """Wrap an indexable dataset so each item also carries the teacher's calibrated logits.

    Item ``i`` of the base dataset must be row ``i`` of the cache (same samples, same order);
    lengths are checked on construction, keys when given, and labels on every access when the
    item is ``(input, label, ...)``. Items come back as ``(*item, teacher_logits)`` for tuples,
    ``{**item, "teacher_logits": ...}`` for dicts, and ``(item, teacher_logits)`` otherwise, with
    ``teacher_logits`` float32 ``[C]`` = ``z / T``.

    Args:
        base: Any dataset with ``len`` and ``[i]`` (a torch ``Dataset``, a list...).
        cache: A :class:`SoftLabelCache` or the path of one.
        keys: The base dataset's sample keys in order, to check against the cache's keys;
            default: the base's own ``keys`` attribute where it has one (as
            :class:`~calibrate_teacher.ImageFolderDataset` does), so the pairing is checked.
        check_labels: Compare integer labels of ``(input, label, ...)`` items with the cache's.
        verify: When ``cache`` is a path: check each shard's SHA-256 on first use (see
            :class:`SoftLabelCache`).

    Raises:
        CacheError: lengths or keys differ (or, on access, a label).
    """

    def __init__(
        self,
        base: IndexableDataset[Item],
        cache: SoftLabelCache | str | os.PathLike[str],
        *,
        keys: Sequence[str] | None = None,
        check_labels: bool = True,
        verify: bool = True,
    ) -> None:
        self.base = base
        self.cache = cache if isinstance(cache, SoftLabelCache) else SoftLabelCache(cache, verify=verify)
        self.check_labels = check_labels
        self._logits = self.cache.logits()
        if len(base) != len(self.cache):
            raise CacheError(
                f"{self.cache.path}: holds {len(self.cache)} rows but the dataset has {len(base)} "
                "samples; export the cache from the same data, in the same order"
            )
        if keys is None:
            own = getattr(base, "keys", None)
            keys = own if isinstance(own, Sequence) and not isinstance(own, str) else None
        if keys is not None:
            cached = self.cache.keys
            if len(keys) != len(cached):
                raise CacheError(
                    f"{self.cache.path}: {len(keys)} keys given for {len(cached)} rows"
                )
            for i, (mine, theirs) in enumerate(zip(keys, cached, strict=True)):
                if mine != theirs:
                    raise CacheError(
                        f"{self.cache.path}: row {i} is {theirs!r} in the cache but {mine!r} "
                        "in the dataset; the dataset's order differs from the cache's"
                    )

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> object:
        item = self.base[index]
        teacher = self._logits[index]
        if isinstance(item, tuple | list):
            if self.check_labels and len(item) >= 2:
                self._check_label(index, item[1])
            return (*item, teacher)
        if isinstance(item, dict):
            return {**item, "teacher_logits": teacher}
        return (item, teacher)

    def _check_label(self, index: int, label: object) -> None:
        import numbers

        import torch

        if isinstance(label, torch.Tensor) and label.numel() == 1 and not label.is_floating_point():
            label = int(label)
        if not isinstance(label, numbers.Integral) or isinstance(label, bool):
            return
        cached = self.cache.label(index)
        if cached >= 0 and int(label) != cached:
            raise CacheError(
                f"{self.cache.path}: sample {index} has label {int(label)} in the dataset but "
                f"{cached} in the cache; the dataset's order differs from the cache's"
            )
