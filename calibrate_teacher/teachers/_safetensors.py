"""Weights + architecture teachers: ``.safetensors`` or a ``.pt``/``.pth`` state dict, + ``--arch``.

Loading builds the architecture, checks the file's keys and shapes against it (a readable diff
instead of PyTorch's wall of text) and loads with ``strict=True``. A ``.pt``/``.pth`` state dict is
read with ``torch.load(weights_only=True)`` only: nothing is unpickled.

The format comes from the bytes, not the suffix: ``pytorch_model.bin`` holding safetensors is
read as safetensors, one holding a ``torch.save`` state dict as a state dict.

Baking folds ``1/T`` into one ``nn.Linear``: its weight and bias are divided by T, so the file
keeps its keys, shapes and dtypes and any script that loads it gets logits / T. Without
``--head`` the head is *proven*, not guessed: the candidates are the Linear whose output is the
model output (through a final ``nn.Softmax`` module, its input), then every other Linear the
forward calls, from the last called to the first (at most eight); each is folded in memory in
turn, and the first whose fold gives ``original / T`` on the probe batch is the head. So a forward
that scales the head's output (``head(x) * 3``) or averages it still bakes. A head whose weight is
tied to another parameter is refused (the file stores the tie twice, so the fold would not
survive loading). With ``--head NAME`` that layer is folded, after the same proof.

An architecture whose ``forward`` takes two or more named parameters (``input_ids``,
``attention_mask=None``...) is fed by name from the batch's mapping: a parameter without a default
must be in the batch (else an error naming it and the batch's fields), one with a default may be
absent, and an absent optional ``attention_mask`` is said in ``notes`` (the model then ran
without a mask, which changes its numbers on padded batches).
"""

from __future__ import annotations

import math
import pickle
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from calibrate_teacher._device import resolve_device
from calibrate_teacher.errors import BakeError, TeacherError
from calibrate_teacher.teachers._arch import build_model
from calibrate_teacher.teachers._files import PROBE_TOLERANCES, BakedFiles, detect_format
from calibrate_teacher.teachers._inputs import InputPlan
from calibrate_teacher.teachers._torch import (
    ModuleFn,
    ModuleTeacher,
    guess_named_sample,
    guess_sample,
    one_named,
    select_output,
)
from calibrate_teacher.teachers.base import Inputs, TeacherFormat

if TYPE_CHECKING:
    import torch

_NESTED_KEYS = ("state_dict", "model_state_dict", "model")
_DP_PREFIX = "module."
#: safetensors metadata keys the bake adds (metadata is str -> str).
META_TEMPERATURE = "calibrate_teacher.temperature"
META_HEAD = "calibrate_teacher.head"
#: Rows of the probe batch a fold is proven on (as many as baking's own check uses).
_PROOF_ROWS = 4
#: Linear layers tried as the head, at most (each try is one probe forward).
_MAX_CANDIDATES = 8


class ArchTeacher(ModuleTeacher):
    """A teacher built from ``--arch`` with weights from a safetensors file or state dict."""

    model: torch.nn.Module
    #: The Linear whose output is the model output (or the input of its final Softmax), if any.
    head: str | None
    #: Every Linear the forward calls, in the order of their last call.
    linears: list[str]
    key_prefix: str
    nested_key: str | None


def load(
    path: Path,
    *,
    device: str,
    output: str | None,
    arch: str | None,
    arch_kwargs: Mapping[str, object] | str | None,
) -> ArchTeacher:
    """Build ``arch``, load the weights at ``path`` into it (strict) and return the teacher."""
    import torch

    if arch is None:
        raise TeacherError(
            f"{path}: holds weights only; name the architecture with --arch pkg.module:factory "
            "or --arch path/to/file.py:factory (plus --arch-kwargs JSON)"
        )
    fmt: TeacherFormat = "safetensors" if detect_format(path, arch=arch) == "safetensors" else "state_dict"
    model = build_model(arch, arch_kwargs)
    state, nested, prefix = read_state(path, fmt)
    _check_keys(path, arch, model, state)
    model.load_state_dict(state, strict=True)
    where = resolve_device(device)
    model.eval().to(where)

    plan = forward_plan(model)

    def call(x: Inputs) -> object:
        if isinstance(x, Mapping):
            return model(**x)
        return model(x)

    def run(x: Inputs) -> object:
        with torch.inference_mode():
            return call(_to(x, where))

    sample: Inputs
    if plan is None:
        sample = guess_sample(model, run, file=path)
    elif len(plan.required) == 1:  # one tensor needed, the others optional: guessed as one
        (name,) = plan.required
        sample = {name: guess_sample(model, one_named(run, name), file=path)}
    else:
        sample = guess_named_sample(model, plan, run, file=path)
    head, softmax, linears = _trace_head(model, call, _to(sample, where), output, path)
    logits_fn = None if softmax is None else _softmax_input(softmax, call)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    teacher = ArchTeacher(
        path,
        fmt,
        model if plan is None else call,
        device=where,
        output=output,
        input_dtype=dtype,
        logits_fn=logits_fn,
        sample=sample,
        plan=plan,
    )
    teacher.model = model
    teacher.head = head
    teacher.linears = linears
    teacher.key_prefix = prefix
    teacher.nested_key = nested
    return teacher


def read_state(path: Path, fmt: TeacherFormat) -> tuple[dict[str, torch.Tensor], str | None, str]:
    """Return (state dict, key it was nested under, ``module.`` prefix that was stripped)."""
    if fmt == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(path)
        except (SafetensorError, OSError) as exc:
            raise TeacherError(f"{path}: cannot read safetensors ({exc})") from exc
        nested = None
    else:
        state, nested = _find_state(path, load_checkpoint(path))
    prefix = ""
    if state and all(k.startswith(_DP_PREFIX) for k in state):
        prefix = _DP_PREFIX  # saved from nn.DataParallel / DistributedDataParallel
        state = {k[len(prefix) :]: v for k, v in state.items()}
    return state, nested, prefix


def load_checkpoint(path: Path) -> object:
    """``torch.load(weights_only=True)``: plain containers of tensors only, never pickled code."""
    import torch

    try:
        with warnings.catch_warnings():
            # torch warns that protocols > 2 "might not" be supported; the load says if not.
            warnings.filterwarnings(
                "ignore", message="Detected pickle protocol", category=UserWarning
            )
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise TeacherError(
            f"{path}: refused: torch.load(weights_only=True) cannot read it, so it holds "
            "pickled Python objects (or is damaged), which are never unpickled: save "
            "model.state_dict() instead, or export the teacher to ONNX / torch.export"
        ) from exc


def _find_state(path: Path, obj: object) -> tuple[dict[str, torch.Tensor], str | None]:
    import torch

    def as_state(value: object) -> dict[str, torch.Tensor] | None:
        if (
            isinstance(value, Mapping)
            and value
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
        ):
            return dict(value)
        return None

    if (state := as_state(obj)) is not None:
        return state, None
    if isinstance(obj, Mapping):
        for key in _NESTED_KEYS:
            if (state := as_state(obj.get(key))) is not None:
                return state, key
    raise TeacherError(
        f"{path}: not a state dict (expected a mapping of names to tensors, at the top level or "
        f"under one of {', '.join(_NESTED_KEYS)})"
    )


def _check_keys(
    path: Path, arch: str, model: torch.nn.Module, state: Mapping[str, torch.Tensor]
) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    parts = [
        f"{len(items)} {what} ({', '.join(items[:4])}{', ...' if len(items) > 4 else ''})"
        for what, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatches", shapes),
        )
        if items
    ]
    if parts:
        raise TeacherError(
            f"{path}: the weights do not fit --arch {arch}: {'; '.join(parts)}; "
            "check --arch and --arch-kwargs"
        )


def forward_plan(model: torch.nn.Module) -> InputPlan | None:
    """The named inputs of a ``forward`` with two or more named parameters; None for one tensor.

    A parameter with a default is optional (``attention_mask=None``): the batch may lack it.
    """
    from calibrate_teacher.teachers._memory import signature_of

    sig = signature_of(model)
    if sig.names is None or len(sig.names) < 2:
        return None
    return InputPlan.of(sig.names, required=sig.required)


def _to(x: Inputs, device: str) -> Inputs:
    if isinstance(x, Mapping):
        return {k: v.to(device) for k, v in x.items()}
    return x.to(device)


def _trace_head(
    model: torch.nn.Module, call: ModuleFn, sample: Inputs, output: str | None, path: Path
) -> tuple[str | None, torch.nn.Softmax | None, list[str]]:
    """Run ``sample`` with hooks: the Linear producing the logits, a final Softmax, every Linear."""
    import torch

    calls: list[tuple[str, torch.nn.Module, object, object]] = []

    def recorder(name: str) -> Callable[[torch.nn.Module, object, object], None]:
        def hook(module: torch.nn.Module, inputs: object, out: object) -> None:
            calls.append((name, module, inputs, out))

        return hook

    handles = [
        sub.register_forward_hook(recorder(name)) for name, sub in model.named_modules() if name
    ]
    try:
        with torch.inference_mode():
            target = select_output(call(sample), output, file=path)
    finally:
        for handle in handles:
            handle.remove()
    softmax = None
    for _name, module, inputs, out in calls:
        if (
            out is target
            and isinstance(module, torch.nn.Softmax)
            and module.dim in (-1, target.ndim - 1)
        ):
            softmax = module
            target = inputs[0] if isinstance(inputs, tuple) else target
    head = None
    linears: list[str] = []  # in the order of their last call
    for name, module, _inputs, out in calls:
        if isinstance(module, torch.nn.Linear):
            if name in linears:
                linears.remove(name)
            linears.append(name)
            if out is target:
                head = name
    return head, softmax, linears


def _softmax_input(softmax: torch.nn.Softmax, call: ModuleFn) -> ModuleFn:
    """A function that runs the model and returns the input of its final Softmax module."""

    def logits_fn(x: Inputs) -> torch.Tensor:
        seen: list[torch.Tensor] = []
        handle = softmax.register_forward_hook(lambda m, i, o: seen.append(i[0]))
        try:
            call(x)
        finally:
            handle.remove()
        return seen[-1]

    return logits_fn


def bake(teacher: ArchTeacher, temperature: float, staged: Path, *, head: str | None) -> BakedFiles:
    """Write the weights with the head Linear divided by ``temperature`` to ``staged``.

    The head is ``head`` or, without it, the first candidate whose fold the probe proves (see
    the module docstring); either way the fold is proven on the probe before anything is written.

    Raises:
        BakeError: ``head`` is no Linear, is tied, or fails the proof; or no candidate passes.
    """
    import torch

    name = _explicit_head(teacher, head, temperature) if head is not None else _find_head(teacher, temperature)
    layer = teacher.model.get_submodule(name)
    keys = [teacher.key_prefix + f"{name}.{p}" for p, _ in layer.named_parameters(recurse=False)]
    if teacher.format == "safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        tensors = load_file(teacher.path)
        with safe_open(teacher.path, "pt") as fh:
            metadata = dict(fh.metadata() or {})
        _scale(tensors, keys, temperature)
        metadata.update({META_TEMPERATURE: repr(temperature), META_HEAD: name})
        save_file(tensors, staged, metadata=metadata)
    else:
        obj = load_checkpoint(teacher.path)
        assert isinstance(obj, dict)  # read_state accepted it as (or as holding) a state dict
        _scale(obj if teacher.nested_key is None else obj[teacher.nested_key], keys, temperature)
        torch.save(obj, staged)
    return BakedFiles(staged, head=name)


def _linears(teacher: ArchTeacher) -> str:
    """The last few Linear layers of the model, for messages."""
    import torch

    names = [n for n, m in teacher.model.named_modules() if isinstance(m, torch.nn.Linear)]
    return ", ".join(names[-4:]) or "none"


def _explicit_head(teacher: ArchTeacher, name: str, temperature: float) -> str:
    """``--head NAME``: a Linear, untied, whose fold the probe proves."""
    import torch

    modules = dict(teacher.model.named_modules())
    layer = modules.get(name) if name else None
    if not isinstance(layer, torch.nn.Linear):
        what = "does not exist" if layer is None else f"is a {type(layer).__name__}, not nn.Linear"
        raise BakeError(f"--head {name!r}: {what} in {teacher.path} (Linear layers: {_linears(teacher)})")
    tied = _tied_to(teacher, name, layer)
    if tied is not None:
        raise BakeError(
            f"--head {name!r}: its weight is tied to {tied} in {teacher.path}; dividing it "
            "would also change that layer: bake the ONNX/torch.export form of the teacher"
        )
    error, tolerance = _Proof(teacher, temperature)(name)
    if not error <= tolerance:  # also NaN
        raise BakeError(
            f"--head {name!r}: folding 1/T into it does not give original / T on the probe batch of "
            f"{teacher.path}: max |baked - original/T| = {error:.3g} > {tolerance:.3g}; name the last "
            "layer before the output, or leave --head out to have it found"
        )
    return name


def _find_head(teacher: ArchTeacher, temperature: float) -> str:
    """The first candidate Linear (see the module docstring) whose fold the probe proves."""
    import torch

    candidates = list(dict.fromkeys([*([teacher.head] if teacher.head else []), *reversed(teacher.linears)]))
    if not candidates:
        raise BakeError(
            f"{teacher.path}: the forward calls no nn.Linear to fold 1/T into; name the final layer "
            f"with --head (Linear layers: {_linears(teacher)}), or bake the ONNX/torch.export form"
        )
    tried: list[str] = []
    prove = _Proof(teacher, temperature)
    for index, name in enumerate(candidates[:_MAX_CANDIDATES]):
        layer = teacher.model.get_submodule(name)
        assert isinstance(layer, torch.nn.Linear)  # _trace_head saw it as one
        tied = _tied_to(teacher, name, layer)
        if tied is not None and index == 0:
            # The layer that makes the logits is shared (LM embeddings): an earlier layer that
            # happens to fold would still be a surprise; the user picks with --head.
            raise BakeError(
                f"{teacher.path}: the head {name!r} has its weight tied to {tied}; dividing it would "
                "also change that layer: name another layer with --head, or bake the "
                "ONNX/torch.export form of the teacher"
            )
        if tied is not None:
            tried.append(f"{name} (tied to {tied})")
            continue
        error, tolerance = prove(name)
        if error <= tolerance:
            return name
        tried.append(f"{name} ({error:.2g} off)")
    more = len(candidates) - _MAX_CANDIDATES
    raise BakeError(
        f"{teacher.path}: folding 1/T into no nn.Linear gives original / T on the probe batch (tried "
        f"{', '.join(tried)}{f' and {more} more untried' if more > 0 else ''}); name the layer with "
        "--head NAME, or bake the ONNX/torch.export form of the teacher"
    )


class _Proof:
    """Folds one Linear at a time in memory and compares the probe's logits with original / T."""

    def __init__(self, teacher: ArchTeacher, temperature: float) -> None:
        self.teacher, self.temperature = teacher, temperature
        self.probe = teacher._probe(_PROOF_ROWS)
        self.expected = teacher.logits(self.probe).double() / temperature
        relative = PROBE_TOLERANCES.get(teacher.precision, PROBE_TOLERANCES["float16"])
        self.tolerance = relative * max(1.0, float(self.expected.abs().max()))

    def __call__(self, name: str) -> tuple[float, float]:
        """(max |folded - original/T|, tolerance) with ``name`` folded, then restored bit for bit.

        The weight and bias are divided as the file's will be (in float64, rounded once).
        """
        import torch

        layer = self.teacher.model.get_submodule(name)
        params = list(layer.parameters(recurse=False))
        saved = [p.detach().clone() for p in params]
        try:
            with torch.no_grad():
                for p in params:
                    p.copy_((p.double() / self.temperature).to(p.dtype))
            got = self.teacher.logits(self.probe).double()
        finally:
            with torch.no_grad():
                for p, original in zip(params, saved, strict=True):
                    p.copy_(original)
        error = float((got - self.expected).abs().max()) if got.shape == self.expected.shape else math.inf
        return (error if math.isfinite(error) else math.inf), self.tolerance


def _scale(tensors: dict[str, torch.Tensor], keys: list[str], temperature: float) -> None:
    for key in keys:
        value = tensors[key]
        # Divide in float64 and round once, so fp32 weights are the correctly rounded W / T.
        tensors[key] = (value.double() / temperature).to(value.dtype).contiguous()


def _tied_to(teacher: ArchTeacher, name: str, layer: torch.nn.Linear) -> str | None:
    """The other parameter that shares the layer's weight (tied LM embeddings), or None."""
    pointer = layer.weight.data_ptr()
    for other, param in teacher.model.named_parameters(remove_duplicate=False):
        if other != f"{name}.weight" and param.data_ptr() == pointer:
            return other
    return None
