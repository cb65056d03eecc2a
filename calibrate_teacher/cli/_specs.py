"""Option groups, defined once: the teacher options build a TeacherSpec, the data options a DataSpec.

A command declares a parameter ``teacher_spec: TeacherSpec | None`` (or ``data_spec``) and is
decorated with :func:`with_options`; the decorator replaces that parameter with the group's
options in the signature Typer reads, and builds the spec from them before calling the command.
So ``--device``, ``--arch``, ``--preprocess``, ``--crop-mode``... are written once here, and
every command that takes a teacher or data gets the same flags with the same help.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar, get_args, get_type_hints

from calibrate_teacher.cli import _data_options as do
from calibrate_teacher.cli import _options as o
from calibrate_teacher.cli import _teacher_options as to
from calibrate_teacher.cli import _text_options as xo

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class OptionGroup:
    """Options that together build one value the command receives as ``name``.

    Attributes:
        name: The command's parameter that receives the built value.
        title: The ``--help`` panel the options are listed under.
        options: ``(parameter name, Annotated type, default)`` for each option.
        build: Makes the value from the command's own arguments and the group's options.
    """

    name: str
    title: str
    options: tuple[tuple[str, object, object], ...]
    build: Callable[[dict[str, Any], dict[str, Any]], object]


def with_options(*groups: OptionGroup) -> Callable[[F], F]:
    """Add each group's options to the command and pass it the value they build."""

    def decorate(command: F) -> F:
        signature = inspect.signature(command, eval_str=True)
        hints = get_type_hints(command, include_extras=True)
        replaced = {group.name for group in groups}
        own = [
            p.replace(annotation=hints.get(p.name, p.annotation))
            for p in signature.parameters.values()
            if p.name not in replaced
        ]
        added = [
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=_panel(kind, group.title)
            )
            for group in groups
            for name, kind, default in group.options
        ]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            for group in groups:
                values = {name: kwargs.pop(name) for name, _, _ in group.options}
                kwargs[group.name] = group.build(kwargs, values)
            return command(**kwargs)

        parameters = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + added
        wrapper.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        del wrapper.__wrapped__  # Typer must see the new signature, not the command's
        return wrapper  # type: ignore[return-value]

    return decorate


def _panel(kind: object, title: str) -> object:
    """``Annotated[T, typer.Option(...)]`` with the option listed under ``title`` in ``--help``."""
    base, *extras = get_args(kind)
    panelled = []
    for extra in extras:
        if hasattr(extra, "rich_help_panel") and extra.rich_help_panel is None:  # an option's own panel wins
            extra = copy.copy(extra)
            extra.rich_help_panel = title
        panelled.append(extra)
    return Annotated[(base, *panelled)] if panelled else kind


def _teacher_spec(own: dict[str, Any], values: dict[str, Any]) -> object:
    from calibrate_teacher.specs import TeacherSpec

    path: Path | None = own.get("teacher")
    items = values.pop("inputs")
    if path is None:
        return None
    return TeacherSpec(path, inputs=_input_map(items), **values)


def _input_map(items: list[str] | None) -> dict[str, str] | None:
    """``--input NAME=FIELD`` items as a mapping (a malformed item is a usage error)."""
    if not items:
        return None
    import typer

    from calibrate_teacher.errors import InvalidValueError
    from calibrate_teacher.teachers._inputs import parse_input_map

    try:
        return parse_input_map(items)
    except InvalidValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--input") from None


def _data_spec(own: dict[str, Any], values: dict[str, Any]) -> object:
    from calibrate_teacher.specs import DataSpec, TextOptions

    data: Path | None = values.pop("data")
    overrides = do.preprocess_overrides(
        input_size=values.pop("input_size"), mean=values.pop("mean"), std=values.pop("std"),
        interpolation=values.pop("interpolation"), crop_pct=values.pop("crop_pct"),
        crop_mode=values.pop("crop_mode"),
    )
    text = TextOptions(**{name: values.pop(name) for name in _TEXT_FIELDS})
    if data is None:
        return None
    return DataSpec(data, overrides=overrides or None, text=None if text == TextOptions() else text, **values)


#: The text options, named as :class:`~calibrate_teacher.specs.TextOptions` fields.
_TEXT_FIELDS = (
    "text_field", "text_pair_field", "label_field", "id_field", "tokenizer", "max_length", "sort_by_length",
    "completion_only",
)


def teacher_group(*, head: bool) -> OptionGroup:
    """``--device --output --arch --arch-kwargs`` (and ``--head`` for commands that bake)."""
    options: tuple[tuple[str, object, object], ...] = (
        ("device", o.DeviceOpt, "auto"),
        ("output", to.OutputNameOpt, None),
        ("arch", to.ArchOpt, None),
        ("arch_kwargs", to.ArchKwargsOpt, None),
        ("trust_remote_code", xo.TrustRemoteCodeOpt, False),
        ("inputs", xo.InputMapOpt, None),
    )
    if head:
        options = (*options, ("head", to.HeadOpt, None))
    return OptionGroup("teacher_spec", "Teacher", options, _teacher_spec)


def data_group(*, data: object = do.DataOpt, required: bool = False, skip_bad: bool = True) -> OptionGroup:
    """``--data``, the preprocessing flags, ``--classes``, ``--batch-size``, ``--workers`` (+ ``--skip-bad``)."""
    options: tuple[tuple[str, object, object], ...] = (
        ("data", data, inspect.Parameter.empty if required else None),
        ("preprocess", do.PreprocessOpt, None),
        ("input_size", do.InputSizeOpt, None),
        ("mean", do.MeanOpt, None),
        ("std", do.StdOpt, None),
        ("interpolation", do.InterpolationOpt, None),
        ("crop_pct", do.CropPctOpt, None),
        ("crop_mode", do.CropModeOpt, None),
        ("classes", do.ClassesOpt, None),
        ("text_field", xo.TextFieldOpt, "text"),
        ("text_pair_field", xo.TextPairFieldOpt, None),
        ("label_field", xo.LabelFieldOpt, "label"),
        ("id_field", xo.IdFieldOpt, None),
        ("tokenizer", xo.TokenizerOpt, None),
        ("max_length", xo.MaxLengthOpt, None),
        ("sort_by_length", xo.SortByLengthOpt, False),
        ("completion_only", xo.CompletionOnlyOpt, False),
        ("batch_size", o.BatchSizeOpt, 64),
        ("workers", o.WorkersOpt, 0),
    )
    if skip_bad:
        options = (*options, ("skip_bad", do.SkipBadOpt, False))
    return OptionGroup("data_spec", "Data and preprocessing", options, _data_spec)


__all__ = ["OptionGroup", "data_group", "teacher_group", "with_options"]
