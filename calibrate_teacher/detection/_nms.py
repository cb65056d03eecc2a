"""Box IoU and class-wise greedy NMS in plain torch (torchvision's ``batched_nms`` semantics).

Greedy NMS visits boxes in descending score order (ties: lower index first) and drops every
later box of the same class whose IoU with a kept box is strictly above the threshold, as
``torchvision.ops.nms`` does. Class-wise: boxes are shifted by ``class * (max coordinate + 1)``
so boxes of different classes never overlap (torchvision's ``batched_nms`` trick).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["box_iou", "class_nms"]


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU ``[N, M]`` of xyxy boxes ``a`` ``[N, 4]`` and ``b`` ``[M, 4]`` (no +1 on widths, as COCO).

    Example:
        >>> import torch
        >>> box_iou(torch.tensor([[0.0, 0, 2, 2]]), torch.tensor([[1.0, 0, 3, 2]])).tolist()
        [[0.3333333432674408]]
    """
    import torch

    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def class_nms(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou: float, *, max_keep: int | None = None
) -> torch.Tensor:
    """Indices kept by class-wise greedy NMS, in descending score order.

    Args:
        boxes: ``[N, 4]`` xyxy.
        scores: ``[N]`` (only their order matters).
        labels: ``[N]`` int class of each box.
        iou: Boxes overlapping a kept box of their class by more than this are dropped.
        max_keep: Stop once this many are kept (the first ``max_keep`` of the full result).

    Returns:
        int64 ``[K]`` indices into the inputs.

    Example:
        >>> import torch
        >>> b = torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10]])
        >>> class_nms(b, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 0, 1]), 0.5).tolist()
        [0, 2]
    """
    import torch

    n = boxes.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    b = boxes.to(torch.float64)
    offset = labels.to(torch.float64)[:, None] * (b.max() - b.min() + 1.0)
    order = torch.sort(scores.to(torch.float64), descending=True, stable=True).indices
    shifted = (b - b.min() + offset)[order]
    removed = [False] * n
    keep: list[int] = []
    limit = n if max_keep is None else max_keep
    for i in range(n):
        if removed[i]:
            continue
        keep.append(i)
        if len(keep) >= limit:
            break
        # One kept box against the boxes after it: O(N K), never an N x N matrix.
        later = (box_iou(shifted[i : i + 1], shifted[i + 1 :])[0] > iou).nonzero().squeeze(1) + (i + 1)
        for j in later.tolist():
            removed[j] = True
    return order[torch.tensor(keep, dtype=torch.int64)]
