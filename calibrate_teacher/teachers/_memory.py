"""In-memory teachers: an ``nn.Module`` (or any callable) a KD script already holds.

:class:`MemoryTeacher` adapts a module, or a callable returning logits, to the
:class:`~calibrate_teacher.teachers.base.Teacher` protocol (format ``"module"``):

* The output may be a tensor, a tuple/list, a mapping or a Hugging Face ``ModelOutput``
  (anything with a key or attribute ``logits``); ``output=`` picks a key, an attribute or an
  index, by default ``logits`` (a tuple's first item).
* ``device`` is where the module's first parameter (or buffer) lives; inputs are moved there and
  floating inputs cast to that parameter's dtype. The module itself is never moved.
* ``num_classes`` is known once it has run on a batch (until then the attribute is missing, so
  ``isinstance(teacher, Teacher)`` is False); the first rows of that batch are kept as
  ``sample``, a probe for :func:`~calibrate_teacher.baking.apply_temperature`.
* Each call measures the module in ``eval()`` mode and restores every submodule's own
  train/eval flag afterwards, so dropout and batch-norm statistics neither add noise nor move.
  It runs under ``torch.no_grad``, not ``inference_mode``: the module lives on in the caller's
  script, and a tensor it caches during forward (a lazily built buffer, a rotary table) would
  otherwise become an inference tensor it could never train through or update in place.

:func:`temperature_scaled` wraps a module so its logits come out divided by T (the rest of a
tuple/mapping output kept), and :func:`fold_into_head` folds 1/T into the last ``nn.Linear``
when a probe batch proves that exact; :func:`~calibrate_teacher.baking.apply_temperature`
chooses between them.
"""

from __future__ import annotations

import copy
import inspect
import itertools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from calibrate_teacher.errors import InvalidValueError, TeacherError
from calibrate_teacher.teachers._inputs import InputPlan, feed_inputs, mask_note
from calibrate_teacher.teachers._torch import (
    Output,
    as_logits,
    divide_logits,
    looks_like_probabilities,
    pick_logits,
)
from calibrate_teacher.teachers.base import Inputs, InputSpec, TeacherFormat, single_input

if TYPE_CHECKING:
    import torch

__all__ = ["MemoryTeacher", "fold_into_head", "temperature_scaled"]

#: Rows of the first batch kept as ``MemoryTeacher.sample``.
SAMPLE_ROWS = 8


@dataclass(frozen=True)
class Signature:
    """The named parameters a callable takes, read from its signature where it has one."""

    names: tuple[str, ...] | None
    required: tuple[str, ...] = ()
    var_keyword: bool = False


def signature_of(fn: Callable[..., object]) -> Signature:
    """The parameters ``fn`` (a module's ``forward``, for a module) takes by name.

    A module whose ``forward`` takes only ``*args, **kwargs`` and that holds a ``module``
    (DataParallel, DistributedDataParallel, our own wrapper) is read through to that module.
    """
    import torch

    target = fn.forward if isinstance(fn, torch.nn.Module) else fn
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):  # builtins and some C extensions have no signature
        return Signature(names=None, var_keyword=True)
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    inner = getattr(fn, "module", None)
    if not named and isinstance(fn, torch.nn.Module) and isinstance(inner, torch.nn.Module):
        return signature_of(inner)
    return Signature(
        names=tuple(p.name for p in named) or None,
        required=tuple(p.name for p in named if p.default is p.empty),
        var_keyword=any(p.kind == p.VAR_KEYWORD for p in params),
    )


def module_of(model: object) -> torch.nn.Module | None:
    """The ``nn.Module`` behind ``model``: itself, or the owner of a bound method."""
    import torch

    if isinstance(model, torch.nn.Module):
        return model
    owner = getattr(model, "__self__", None)
    return owner if isinstance(owner, torch.nn.Module) else None


def placement(module: torch.nn.Module | None) -> tuple[str, torch.dtype | None]:
    """Where the module's first parameter (else buffer) lives, and its first floating dtype."""
    if module is None:
        return "cpu", None
    tensors = list(itertools.chain(module.parameters(), module.buffers()))
    device = str(tensors[0].device) if tensors else "cpu"
    floating = next((t.dtype for t in tensors if t.is_floating_point()), None)
    return device, floating


def move_inputs(inputs: Inputs, device: str, dtype: torch.dtype | None) -> Inputs:
    """Inputs on ``device`` (each tensor of a mapping too), floating ones cast to ``dtype``."""
    import torch

    def move(x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            return x
        cast = dtype if dtype is not None and x.is_floating_point() else None
        return x.to(device=device, dtype=cast, non_blocking=True)

    if isinstance(inputs, Mapping):
        return {k: move(v) for k, v in inputs.items()}
    return move(inputs)


@contextmanager
def eval_mode(module: torch.nn.Module | None) -> Iterator[None]:
    """Put the module in ``eval()`` and give every submodule its own flag back afterwards."""
    if module is None:
        yield
        return
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def invoke(
    fn: Callable[..., object],
    inputs: Inputs,
    sig: Signature,
    *,
    where: Path,
    notes: list[str] | None = None,
) -> object:
    """Call ``fn`` on one tensor, or with a mapping's entries as keyword arguments.

    With ``notes``, batch entries the forward does not take, and an optional ``attention_mask``
    the batch lacks (the model then runs without a mask), are said there once each.

    Raises:
        TeacherError: the mapping lacks a required parameter of ``fn``.
    """
    if not isinstance(inputs, Mapping):
        return fn(inputs)
    if not sig.var_keyword and (sig.names is None or len(sig.names) == 1):
        return fn(single_input(inputs, name=sig.names[0] if sig.names else None, where=where))
    if sig.var_keyword or sig.names is None:
        kwargs = dict(inputs)
    else:
        kwargs = {k: v for k, v in inputs.items() if k in sig.names}
    missing = [name for name in sig.required if name not in kwargs]
    if missing:
        raise TeacherError(
            f"{where}: forward needs {', '.join(missing)} but the batch holds "
            f"{', '.join(map(str, inputs)) or 'nothing'}; name the batch entries after its "
            f"parameters, or map them with --input {missing[0]}=FIELD"
        )
    if notes is not None and sig.names is not None:
        plan = InputPlan.of(sig.names, required=sig.required)
        if not sig.var_keyword:  # the one resolver says what was left out
            kwargs = feed_inputs(inputs, plan, where=where, notes=notes)
        else:  # **kwargs takes every entry; only a missing optional mask is worth saying
            note = mask_note(inputs, plan, where=where)
            if note is not None and note not in notes:
                notes.append(note)
    return fn(**kwargs)


def label_of(model: object) -> Path:
    """A descriptive stand-in for a file path, used in messages: ``<ResNet>``."""
    kind = type(model).__name__
    if kind in ("function", "method", "builtin_function_or_method"):
        kind = str(getattr(model, "__qualname__", kind))
    return Path(kind if kind.startswith("<") else f"<{kind}>")  # a lambda is already <lambda>


class MemoryTeacher:
    """A :class:`~calibrate_teacher.teachers.base.Teacher` over an in-memory module or callable.

    Attributes:
        model: The module or callable, as given (never moved or copied).
        module: The ``nn.Module`` behind it (itself, or a bound method's owner), else None.
        output: Which entry of its output holds the logits (see :func:`pick_logits`).
        sample: The first rows of the first batch (on the CPU), once one has run.
        notes: Remarks for stderr: batch entries the forward does not take, an optional
            ``attention_mask`` the batch lacks (the model ran without a mask); each said once.
    """

    format: TeacherFormat = "module"
    input_spec: InputSpec | None = None
    #: A module records no input shapes or dtypes.
    input_specs: tuple[InputSpec, ...] = ()
    num_classes: int  # set by the first batch

    def __init__(self, model: Callable[..., object], *, output: Output = None, name: str | None = None) -> None:
        """Adapt ``model``; nothing runs until the first batch.

        Raises:
            InvalidValueError: ``model`` is not callable.
        """
        if not callable(model):
            raise InvalidValueError(
                f"teacher: {type(model).__name__} is not callable; pass an nn.Module, a function "
                "returning logits, or a teacher file"
            )
        self.model = model
        self.module = module_of(model)
        self.output = output
        self.path = Path(name) if name is not None else label_of(self.module or model)
        self.device, self._dtype = placement(self.module)
        self._signature = signature_of(model)
        self.input_names = self._signature.names
        self.notes: list[str] = []
        self.sample: Inputs | None = None

    def raw(self, batch: Inputs) -> object:
        """The model's own output for ``batch``, measured in eval mode without autograd."""
        import torch

        inputs = move_inputs(batch, self.device, self._dtype)
        with eval_mode(self.module), torch.no_grad():
            return invoke(self.model, inputs, self._signature, where=self.path, notes=self.notes)

    def logits(self, batch: Inputs) -> torch.Tensor:
        """Return float logits ``[n, num_classes]`` on the model's device.

        Raises:
            TeacherError: the output holds no ``[n, C]`` float logits, or looks like
                probabilities.
        """
        values = as_logits(
            pick_logits(self.raw(batch), self.output, where=self.path), file=self.path,
            fix="pick the logits with output=",
        )
        if not hasattr(self, "num_classes"):
            if looks_like_probabilities(values):
                raise TeacherError(
                    f"{self.path}: the output rows are non-negative and sum to 1, so they are "
                    "probabilities; pass a module that returns the pre-softmax logits"
                )
            self.num_classes = int(values.shape[1])
            self.sample = head_rows(batch, SAMPLE_ROWS)
        return values


def head_rows(inputs: Inputs, rows: int) -> Inputs:
    """Copies (on the CPU) of the first ``rows`` rows: a probe that keeps no batch alive."""
    import torch

    def cut(x: torch.Tensor) -> torch.Tensor:
        return x[:rows].detach().to("cpu", copy=True) if isinstance(x, torch.Tensor) else x

    if isinstance(inputs, Mapping):
        return {k: cut(v) for k, v in inputs.items()}
    return cut(inputs)


# --- temperature: a wrapper module, or 1/T folded into the last Linear -----------------------

_CLASSES: dict[str, type[torch.nn.Module]] = {}


def _wrapper_class() -> type[torch.nn.Module]:
    """``TemperatureScaled``, built on first use so that importing this module needs no torch."""
    import torch

    cached = _CLASSES.get("TemperatureScaled")
    if cached is not None:
        return cached

    class TemperatureScaled(torch.nn.Module):
        """``module``'s outputs with the logits divided by ``temperature``.

        Attributes:
            module: The wrapped module (the caller's own; not a copy).
            temperature: T.
            output: Which entry holds the logits (see ``pick_logits``).
        """

        def __init__(self, module: torch.nn.Module, temperature: float, output: Output = None) -> None:
            super().__init__()
            self.module = module
            self.temperature = float(temperature)
            self.output = output
            self.training = module.training

        def forward(self, *args: object, **kwargs: object) -> object:
            out = self.module(*args, **kwargs)
            return divide_logits(out, self.temperature, self.output, where=label_of(self.module))

        def extra_repr(self) -> str:
            return f"temperature={self.temperature}"

    # Picklable as calibrate_teacher.teachers._memory.TemperatureScaled (module __getattr__).
    TemperatureScaled.__qualname__ = "TemperatureScaled"
    TemperatureScaled.__module__ = __name__
    _CLASSES["TemperatureScaled"] = TemperatureScaled
    return TemperatureScaled


def __getattr__(name: str) -> object:
    if name == "TemperatureScaled":
        return _wrapper_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def temperature_scaled(module: torch.nn.Module, temperature: float, output: Output = None) -> torch.nn.Module:
    """A ``TemperatureScaled`` wrapper: ``module``'s outputs with the logits divided by T."""
    return _wrapper_class()(module, temperature, output)


@dataclass(frozen=True)
class Fold:
    """A fold that passed its probe: the module, the Linear folded and the probe's error."""

    module: torch.nn.Module
    head: str
    max_abs_error: float
    tolerance: float


def _last_linear(module: torch.nn.Module, run: Callable[[torch.nn.Module], object]) -> tuple[str | None, object]:
    """Run once with hooks on every ``nn.Linear``; return the last one called and the output."""
    import torch

    called: list[str] = []
    handles = [
        sub.register_forward_hook(lambda *_, name=name: called.append(name))
        for name, sub in module.named_modules()
        if isinstance(sub, torch.nn.Linear)
    ]
    try:
        out = run(module)
    finally:
        for handle in handles:
            handle.remove()
    return (called[-1] if called else None), out


def _is_tied(module: torch.nn.Module, head: torch.nn.Linear) -> bool:
    """True when the head's weight is also another module's parameter (tied LM embeddings)."""
    ids = [id(p) for _, p in module.named_parameters(remove_duplicate=False)]
    return ids.count(id(head.weight)) > 1


def _sharing_copy(module: torch.nn.Module, head: torch.nn.Linear) -> torch.nn.Module:
    """A copy of the module tree sharing every tensor but the head's weight and bias."""
    own = {id(head.weight)} | ({id(head.bias)} if head.bias is not None else set())
    memo: dict[int, object] = {
        id(t): t for t in itertools.chain(module.parameters(), module.buffers()) if id(t) not in own
    }
    return copy.deepcopy(module, memo)


def fold_into_head(
    module: torch.nn.Module,
    temperature: float,
    probe: Inputs,
    *,
    output: Output,
    inplace: bool,
    tolerances: Mapping[str, float],
) -> Fold | None:
    """Fold 1/T into the last ``nn.Linear`` the forward calls, if the probe proves it exact.

    The last Linear called on ``probe`` gets ``W/T`` and ``b/T`` (computed in float64, stored in
    its dtype); the folded module must then give ``original / T`` on the probe within
    ``tolerances[dtype] * max(1, max |original / T|)``. Otherwise (no Linear, a tied head, a
    forward that is not linear in the head's output, a module that cannot be copied) nothing is
    changed and None comes back.
    """
    import torch

    where = label_of(module)
    device, dtype = placement(module)
    inputs = move_inputs(probe, device, dtype)
    sig = signature_of(module)

    def run(m: torch.nn.Module) -> torch.Tensor:
        with eval_mode(m), torch.no_grad():
            return pick_logits(invoke(m, inputs, sig, where=where), output, where=where)

    name, first = _last_linear(module, run)
    if name is None:
        return None
    head = module.get_submodule(name)
    assert isinstance(head, torch.nn.Linear)
    if _is_tied(module, head):
        return None
    if not isinstance(first, torch.Tensor):
        return None
    expected = first.double() / temperature
    if inplace:
        target = module
    else:
        try:
            target = _sharing_copy(module, head)
        except (TypeError, RuntimeError, copy.Error):  # locks, handles, compiled code...
            return None
    folded = target.get_submodule(name)
    assert isinstance(folded, torch.nn.Linear)
    params = [p for p in (folded.weight, folded.bias) if p is not None]
    saved = [p.detach().clone() for p in params] if inplace else []
    with torch.no_grad():
        for p in params:
            p.copy_((p.double() / temperature).to(p.dtype))
    got = run(target).double()
    relative = tolerances.get(str(first.dtype).removeprefix("torch."), max(tolerances.values()))
    tolerance = relative * max(1.0, float(expected.abs().max())) if expected.numel() else relative
    error = float((got - expected).abs().max()) if got.shape == expected.shape and got.numel() else float("inf")
    if error <= tolerance:  # False for NaN
        return Fold(module=target, head=name, max_abs_error=error, tolerance=tolerance)
    if inplace:
        with torch.no_grad():
            for p, original in zip(params, saved, strict=True):
                p.copy_(original)
    return None
