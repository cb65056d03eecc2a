"""The one protocol every teacher backend implements, and the shape of its inputs.

A batch's inputs are one tensor, or a mapping of named tensors (``input_ids``,
``attention_mask``...) for a teacher that takes several. A teacher says which names it takes in
``input_names``; a teacher with at most one name is always given a single tensor
(:func:`single_input` picks it out of a mapping, which :func:`~calibrate_teacher.collect.iter_logits`
does for it), so single-tensor backends work exactly as they did before named inputs existed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, TypeAlias, runtime_checkable

from calibrate_teacher.errors import InputError

if TYPE_CHECKING:
    import torch

TeacherFormat = Literal["onnx", "torchscript", "safetensors", "state_dict", "export", "module", "hf"]

#: A batch of teacher inputs: one tensor, or named tensors for a teacher with several inputs.
Inputs: TypeAlias = "torch.Tensor | Mapping[str, torch.Tensor]"


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
        path: The file it was loaded from (an in-memory module: a label such as ``<Net>``).
        format: Which backend loaded it.
        num_classes: The width of the logits it returns (an in-memory module: known once it
            has run on a batch).
        input_spec: What it expects, where the file says; None otherwise.
        input_names: The names of the inputs it takes, in order (ONNX input names, a module's
            ``forward`` parameters), or None for one unnamed tensor. A teacher with two or
            more names is given a mapping holding them; any other is given one tensor.
        device: Where it runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).
        notes: One-line remarks for the user, printed on stderr.
    """

    path: Path
    format: TeacherFormat
    num_classes: int
    input_spec: InputSpec | None
    input_names: tuple[str, ...] | None
    device: str

    @property
    def notes(self) -> Sequence[str]:
        """One-line remarks for the user (a provider fallback, an ignored option...)."""
        ...

    def logits(self, batch: Inputs) -> torch.Tensor:
        """Return the pre-softmax logits ``[n, num_classes]`` (float) for a batch of inputs."""
        ...


def takes_mapping(teacher: Teacher) -> bool:
    """True when the teacher takes named inputs (two or more ``input_names``)."""
    return teacher.input_names is not None and len(teacher.input_names) > 1


def single_input(inputs: Inputs, *, name: str | None, where: Path) -> torch.Tensor:
    """The one tensor a single-input teacher runs on: ``inputs`` itself, or a mapping's entry.

    A mapping gives its entry called ``name`` (the teacher's one input name), else its only
    entry.

    Raises:
        InputError: a mapping with several entries, none of them called ``name``.
    """
    if not isinstance(inputs, Mapping):
        return inputs
    if name is not None and name in inputs:
        return inputs[name]
    if len(inputs) == 1:
        return next(iter(inputs.values()))
    keys = ", ".join(map(str, inputs)) or "none"
    wanted = f"an input named {name!r}" if name is not None else "one input"
    raise InputError(
        f"{where}: takes {wanted} but the batch holds named inputs ({keys}); yield "
        "(inputs, labels) pairs, or one named input besides labels"
    )
