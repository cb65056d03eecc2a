"""Named inputs: which batch field feeds which model input, and in which dtype.

A teacher with several inputs (``input_ids``, ``attention_mask``, ``token_type_ids``,
``pixel_values``...) is fed *by name* from the batch's mapping. This module is the one place that
resolves names, used by every backend (ONNX, TorchScript, ``.pt2``, weights + ``--arch``, in
memory) and by :func:`~calibrate_teacher.collect.iter_logits`:

* :func:`parse_input_map` reads ``--input NAME=FIELD`` items into ``{model_input: batch_field}``;
  :func:`rename_fields` applies such a map to a batch (a mapped field the batch lacks is an
  error naming it).
* :func:`resolve_inputs` picks the model's inputs out of a batch: a required input the batch
  lacks is an error naming the input and the fields the batch has; an optional one (a forward
  parameter with a default) may be absent; fields the model does not take are returned as
  ignored, so the teacher can say so once in its ``notes``. Each input is cast to the dtype the
  model declares (int64 ids, bool/int masks); a float tensor with non-integral values is never
  turned into ids or a mask silently: that is an error naming the input.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from calibrate_teacher.errors import InputError, InvalidValueError, TeacherError

if TYPE_CHECKING:
    import torch

    from calibrate_teacher.teachers.base import Inputs

__all__ = ["InputPlan", "feed_inputs", "mask_note", "parse_input_map", "rename_fields", "resolve_inputs"]

_INTEGER = ("int64", "int32", "int16", "int8", "uint8")


def parse_input_map(items: Sequence[str]) -> dict[str, str]:
    """Read ``NAME=FIELD`` items (``--input``, repeatable) into ``{model_input: batch_field}``.

    >>> parse_input_map(["input_ids=ids", "attention_mask=mask"])
    {'input_ids': 'ids', 'attention_mask': 'mask'}

    Raises:
        InvalidValueError: an item without ``=``, an empty name or field, or a model input
            (or a batch field) named twice.
    """
    mapping: dict[str, str] = {}
    fields: dict[str, str] = {}
    for item in items:
        name, sep, field = str(item).partition("=")
        name, field = name.strip(), field.strip()
        if not sep or not name or not field:
            raise InvalidValueError(
                f"--input {item!r}: expected NAME=FIELD (the model's input name = the batch's field), "
                "e.g. --input input_ids=ids"
            )
        if name in mapping:
            raise InvalidValueError(f"--input {item!r}: the model input {name!r} is mapped twice")
        if field in fields:
            raise InvalidValueError(
                f"--input {item!r}: the field {field!r} already feeds {fields[field]!r}; map each field once"
            )
        mapping[name], fields[field] = field, name
    return mapping


def rename_fields(inputs: Inputs, mapping: Mapping[str, str] | None, *, where: Path) -> Inputs:
    """The batch with its fields renamed after the model's inputs, per ``{model_input: field}``.

    A mapped field is taken away under its own name and given under the model's input name;
    every other field is kept as it is. An empty or None ``mapping`` returns ``inputs`` itself.

    Raises:
        InputError: a mapped field is missing from the batch, or the batch is one tensor.
    """
    if not mapping:
        return inputs
    if not isinstance(inputs, Mapping):
        raise InputError(
            f"{where}: --input {_pairs(mapping)} maps named fields, but the batch is one tensor "
            "without names; drop --input, or give data with named fields"
        )
    missing = [field for field in mapping.values() if field not in inputs]
    if missing:
        raise InputError(
            f"{where}: --input names the field(s) {', '.join(missing)}, but the batch holds "
            f"{_fields(inputs)}; map the model's inputs to fields the data has"
        )
    used = set(mapping.values())
    renamed = {k: v for k, v in inputs.items() if k not in used and k not in mapping}
    renamed.update({name: inputs[field] for name, field in mapping.items()})
    return renamed


@dataclass(frozen=True)
class InputPlan:
    """What a model takes by name: its inputs in order, which are required, their dtypes.

    Attributes:
        names: The model's input names, in the order the model takes them.
        required: The names that must be fed (ONNX and ``.pt2`` inputs: all of them; a forward
            parameter with a default is optional).
        dtypes: The dtype each input is cast to (numpy-style name), where the model declares it.
    """

    names: tuple[str, ...]
    required: tuple[str, ...]
    dtypes: Mapping[str, str | None]

    @classmethod
    def of(
        cls,
        names: Iterable[str],
        *,
        required: Iterable[str] | None = None,
        dtypes: Mapping[str, str | None] | None = None,
    ) -> InputPlan:
        """A plan over ``names`` (all required unless ``required`` says otherwise)."""
        listed = tuple(names)
        return cls(
            names=listed,
            required=listed if required is None else tuple(required),
            dtypes=dict(dtypes or {}),
        )


def resolve_inputs(
    inputs: Inputs, plan: InputPlan, *, where: Path
) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """The model's inputs picked out of a batch by name and cast, plus the fields left unused.

    A batch that is one tensor feeds a model's one required input (the others optional). A
    mapping feeds each
    input from the field of its name; a model with one required input and a batch with one
    field is fed that field, whatever its name.

    Returns:
        ``(named, ignored)``: the inputs fed, in the model's order (optional ones the batch
        lacks left out), and the batch fields the model does not take.

    Raises:
        TeacherError: a required input has no field of its name (the message names the input
            and the fields the batch has), or a one-tensor batch for a model with several inputs.
        InputError: a float tensor with non-integral values for an integer or bool input.
    """
    if not isinstance(inputs, Mapping):
        if len(plan.required) > 1:
            raise TeacherError(
                f"{where}: the model takes {len(plan.names)} named inputs ({', '.join(plan.names)}) "
                "but the batch is one tensor; give the data as named fields (a mapping, or an "
                ".npz/.safetensors with one array per input)"
            )
        name = (plan.required or plan.names or ("inputs",))[0]
        return {name: cast_input(inputs, plan.dtypes.get(name), name=name, where=where)}, ()
    if len(plan.required) == 1 and plan.required[0] not in inputs and len(inputs) == 1:
        # One input needed, one field given: it is that input, whatever its name.
        name = plan.required[0]
        (value,) = inputs.values()
        return {name: cast_input(value, plan.dtypes.get(name), name=name, where=where)}, ()
    missing = [name for name in plan.required if name not in inputs]
    if missing:
        fed = "its input" if len(missing) == 1 else "its inputs"
        raise TeacherError(
            f"{where}: the model needs {fed} {', '.join(repr(m) for m in missing)} but the batch "
            f"holds {_fields(inputs)}; name the data's fields after the model's inputs, or map "
            f"them with --input {missing[0]}=FIELD"
        )
    named = {
        name: cast_input(inputs[name], plan.dtypes.get(name), name=name, where=where)
        for name in plan.names
        if name in inputs
    }
    ignored = tuple(str(k) for k in inputs if k not in named)
    return named, ignored


def feed_inputs(
    inputs: Inputs, plan: InputPlan, *, where: Path, notes: list[str]
) -> dict[str, torch.Tensor]:
    """:func:`resolve_inputs`, saying once in ``notes`` what was left out.

    Two notes, each added once: the batch fields the model does not take, and (for a model
    whose optional ``attention_mask`` the batch does not give) that the model ran without a
    mask, which a padded batch makes a different number (:func:`mask_note`).
    """
    named, ignored = resolve_inputs(inputs, plan, where=where)
    said = [mask_note(inputs, plan, where=where)]
    if ignored:
        said.append(
            f"{where.name}: batch field(s) {', '.join(ignored)} ignored: the model takes "
            f"{', '.join(plan.names)}"
        )
    notes.extend(note for note in said if note is not None and note not in notes)
    return named


def mask_note(inputs: Inputs, plan: InputPlan, *, where: Path) -> str | None:
    """The note for a batch of named fields without the model's optional mask input, or None."""
    if not isinstance(inputs, Mapping):
        return None
    absent = [n for n in plan.names if "mask" in n and n not in plan.required and n not in inputs]
    if not absent:
        return None
    return (
        f"{where.name}: the batch has no {', '.join(absent)}, so the model ran without a mask "
        f"(padding is attended to); give the data a field {absent[0]!r}, or map one with "
        f"--input {absent[0]}=FIELD"
    )


def cast_input(x: torch.Tensor, dtype: str | None, *, name: str, where: Path) -> torch.Tensor:
    """``x`` in the dtype the model declares for input ``name`` (unchanged when none is known).

    Raises:
        InputError: a float tensor with non-integral values for an integer or bool input, or
            values other than 0/1 for a bool input.
    """
    import torch

    if dtype is None or not isinstance(x, torch.Tensor):
        return x
    target = getattr(torch, dtype, None)
    if not isinstance(target, torch.dtype) or x.dtype == target:
        return x
    if dtype in _INTEGER or dtype == "bool":
        if x.is_floating_point() and not bool((x == x.round()).all()):
            raise InputError(
                f"{where}: input {name!r} is {dtype} in the model but the batch gives "
                f"{str(x.dtype).removeprefix('torch.')} with non-integral values; store "
                f"{name} as integers (token ids, 0/1 masks), not as floats"
            )
        if dtype == "bool" and not bool(((x == 0) | (x == 1)).all()):
            raise InputError(
                f"{where}: input {name!r} is bool in the model but the batch gives values "
                "other than 0 and 1; store it as a 0/1 mask"
            )
    return x.to(target)


def _fields(inputs: Mapping[str, object]) -> str:
    return ", ".join(map(str, inputs)) or "no fields"


def _pairs(mapping: Mapping[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in mapping.items())
