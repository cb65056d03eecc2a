"""Batches a model cannot take whole or as shaped: running them in chunks, refusing other shapes.

A model that runs only on some batch sizes (a torch.export program or ONNX graph exported with a
static batch, or a dynamic one with bounds) gets ``batch_rows``: :func:`run_in_chunks` splits a
batch into chunks it accepts, pads a short chunk by repeating its last row (zeros for an empty
batch) and drops the padding's outputs, so the logits of every row are the model's own. A teacher
that records its input shape (``input_spec``) refuses a batch whose fixed non-batch dimensions
differ with one line (:func:`check_input_shape`) instead of the exporter's guard traceback.

Shared by the PyTorch backends (:mod:`~calibrate_teacher.teachers._torch`) and ONNX.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from calibrate_teacher.errors import TeacherError

if TYPE_CHECKING:
    import torch

    from calibrate_teacher.teachers.base import Inputs, InputSpec

#: The batch sizes a model runs on: (fewest rows, most rows or None for no upper bound).
BatchRows = tuple[int, int | None]


def run_in_chunks(
    run: Callable[[Inputs], torch.Tensor],
    x: Inputs,
    rows: BatchRows | None,
    *,
    file: Path,
) -> torch.Tensor:
    """``run(x)`` for a model that takes only ``rows`` = (fewest, most) rows per call.

    ``x`` is one tensor, or named tensors that share their first dimension (a multi-input
    model): each chunk cuts every one of them at the same rows. The batch runs in chunks of at
    most ``most`` rows; a chunk short of ``fewest`` is padded by repeating its last row (zeros
    for an empty batch) and the padding's outputs are dropped.

    Raises:
        TeacherError: an output whose first dimension is not the chunk's rows (the rows cannot
            be told apart).
    """
    import torch

    tensors = list(x.values()) if isinstance(x, Mapping) else [x]
    if rows is None or not tensors or any(t.ndim == 0 for t in tensors):
        return run(x)
    n = int(tensors[0].shape[0])
    fewest, most = rows
    if fewest <= n and (most is None or n <= most):
        return run(x)
    size = most if most is not None else max(n, fewest)
    outputs: list[torch.Tensor] = []
    for start in range(0, max(n, 1), size):
        part = _cut(x, start, start + size)
        kept = min(size, max(n - start, 0))
        if kept < fewest:
            part = _pad(part, fewest - kept, kept)
        out = run(part)
        got = fewest if kept < fewest else kept
        if out.ndim == 0 or out.shape[0] != got:
            raise TeacherError(
                f"{file}: the model runs on batches of {_rows_text(rows)} rows, so batches run in "
                f"chunks, but its output for {got} rows has shape {tuple(out.shape)}; "
                "export it with a dynamic batch dimension"
            )
        outputs.append(out[:kept])
    return torch.cat(outputs)


def _cut(x: Inputs, start: int, stop: int) -> Inputs:
    if isinstance(x, Mapping):
        return {k: v[start:stop] for k, v in x.items()}
    return x[start:stop]


def _pad(x: Inputs, extra: int, kept: int) -> Inputs:
    """``x`` with ``extra`` more rows: its last row repeated (zeros when it has none)."""
    import torch

    def pad(t: torch.Tensor) -> torch.Tensor:
        filler = t[-1:].expand(extra, *t.shape[1:]) if kept else t.new_zeros((extra, *t.shape[1:]))
        return torch.cat([t, filler])

    if isinstance(x, Mapping):
        return {k: pad(v) for k, v in x.items()}
    return pad(x)


def _rows_text(rows: BatchRows) -> str:
    fewest, most = rows
    if fewest == most:
        return str(fewest)
    return f"{fewest}..{most}" if most is not None else f"{fewest} or more"


def batch_note(file: Path, rows: BatchRows | None, hint: str) -> list[str]:
    """A note for a model whose batch size is fixed or bounded (it will run in chunks)."""
    if rows is None:
        return []
    fewest, most = rows
    if most is None and fewest <= 2:  # torch.export's default lower bound; nothing to say
        return []
    what = f"fixed at {fewest}" if fewest == most else f"limited to {_rows_text(rows)}"
    return [
        f"{file.name}: the batch size is {what}; batches run in chunks of that size (padded, "
        f"padding dropped); {hint} to run them whole"
    ]


def check_input_shape(
    x: torch.Tensor,
    spec: InputSpec | None,
    *,
    file: Path,
    fix: Callable[[Sequence[int]], str],
) -> None:
    """Refuse inputs whose rank or fixed non-batch dimensions differ from the recorded shape.

    Raises:
        TeacherError: naming the expected and given shapes and ``fix(dims)`` for the dims.
    """
    if spec is None or not spec.shape:
        return
    expected, got = spec.shape, tuple(int(d) for d in x.shape)
    if len(got) != len(expected):
        dims: list[int] = []
    else:
        dims = [i for i, (d, g) in enumerate(zip(expected, got, strict=True)) if i and d is not None and d != g]
        if not dims:
            return
    want = ", ".join("N" if i == 0 else ("?" if d is None else str(d)) for i, d in enumerate(expected))
    remedy = f"; resize the inputs, or {fix(dims)}" if dims else ""
    raise TeacherError(f"{file}: the model takes inputs of shape ({want}), got {got}{remedy}")
