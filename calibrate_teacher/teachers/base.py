"""The one protocol every teacher backend implements."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

TeacherFormat = Literal["onnx", "torchscript", "safetensors", "state_dict", "export"]


@dataclass(frozen=True)
class InputSpec:
    """What a teacher expects as input, as far as the file says.

    Attributes:
        name: The input's name (ONNX input name), or None where the format has none.
        shape: The input shape; ``None`` marks a dynamic dimension (the batch, usually).
        dtype: The element type as a numpy-style name, e.g. ``"float32"``.
    """

    name: str | None
    shape: tuple[int | None, ...]
    dtype: str


@runtime_checkable
class Teacher(Protocol):
    """A loaded teacher: something that turns a batch of inputs into class logits.

    Attributes:
        path: The file it was loaded from.
        format: Which backend loaded it.
        num_classes: The width of the logits it returns.
        input_spec: What it expects, where the file says; None otherwise.
        device: Where it runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).
    """

    path: Path
    format: TeacherFormat
    num_classes: int
    input_spec: InputSpec | None
    device: str

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Return the pre-softmax logits ``[n, num_classes]`` (float) for a batch of inputs."""
        ...
