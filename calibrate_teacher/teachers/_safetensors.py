"""Weights + architecture teachers: ``.safetensors`` or a ``.pt``/``.pth`` state dict, + ``--arch``.

Loading builds the architecture, checks the file's keys and shapes against it (a readable diff
instead of PyTorch's wall of text) and loads with ``strict=True``. A ``.pt``/``.pth`` state dict is
read with ``torch.load(weights_only=True)`` only: nothing is unpickled.

Baking folds ``1/T`` into the final ``nn.Linear``: its weight and bias are divided by T, so the
file keeps its keys, shapes and dtypes and any script that loads it gets logits / T. The head is
the Linear whose output *is* the model output (found with forward hooks on a probe batch; through
a final ``nn.Softmax`` module, its input) or the one named with ``--head``.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from calibrate_teacher._device import resolve_device
from calibrate_teacher.errors import BakeError, TeacherError
from calibrate_teacher.teachers._arch import build_model
from calibrate_teacher.teachers._files import BakedFiles
from calibrate_teacher.teachers._torch import ModuleFn, ModuleTeacher, guess_sample, select_output
from calibrate_teacher.teachers.base import TeacherFormat

if TYPE_CHECKING:
    import torch

_NESTED_KEYS = ("state_dict", "model_state_dict", "model")
_DP_PREFIX = "module."
#: safetensors metadata keys the bake adds (metadata is str -> str).
META_TEMPERATURE = "calibrate_teacher.temperature"
META_HEAD = "calibrate_teacher.head"


class ArchTeacher(ModuleTeacher):
    """A teacher built from ``--arch`` with weights from a safetensors file or state dict."""

    model: torch.nn.Module
    head: str | None
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

    fmt: TeacherFormat = "safetensors" if path.suffix.lower() == ".safetensors" else "state_dict"
    if arch is None:
        raise TeacherError(
            f"{path}: holds weights only; name the architecture with --arch pkg.module:factory "
            "or --arch path/to/file.py:factory (plus --arch-kwargs JSON)"
        )
    model = build_model(arch, arch_kwargs)
    state, nested, prefix = read_state(path)
    _check_keys(path, arch, model, state)
    model.load_state_dict(state, strict=True)
    where = resolve_device(device)
    model.eval().to(where)

    def run(x: torch.Tensor) -> object:
        with torch.inference_mode():
            return model(x.to(where))

    sample = guess_sample(model, run, file=path)
    head, softmax = _trace_head(model, sample.to(where), output, path)
    logits_fn = None if softmax is None else _softmax_input(softmax, model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    teacher = ArchTeacher(
        path,
        fmt,
        model,
        device=where,
        output=output,
        input_dtype=dtype,
        logits_fn=logits_fn,
        sample=sample,
    )
    teacher.model = model
    teacher.head = head
    teacher.key_prefix = prefix
    teacher.nested_key = nested
    return teacher


def read_state(path: Path) -> tuple[dict[str, torch.Tensor], str | None, str]:
    """Return (state dict, key it was nested under, ``module.`` prefix that was stripped)."""
    if path.suffix.lower() == ".safetensors":
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


def _trace_head(
    model: torch.nn.Module, sample: torch.Tensor, output: str | None, path: Path
) -> tuple[str | None, torch.nn.Softmax | None]:
    """Run ``sample`` with hooks; return the Linear producing the logits and a final Softmax."""
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
            target = select_output(model(sample), output, file=path)
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
    for name, module, _inputs, out in calls:
        if out is target and isinstance(module, torch.nn.Linear):
            head = name
    return head, softmax


def _softmax_input(softmax: torch.nn.Softmax, model: torch.nn.Module) -> ModuleFn:
    """A function that runs ``model`` and returns the input of its final Softmax module."""

    def logits_fn(x: torch.Tensor) -> torch.Tensor:
        seen: list[torch.Tensor] = []
        handle = softmax.register_forward_hook(lambda m, i, o: seen.append(i[0]))
        try:
            model(x)
        finally:
            handle.remove()
        return seen[-1]

    return logits_fn


def bake(teacher: ArchTeacher, temperature: float, staged: Path, *, head: str | None) -> BakedFiles:
    """Write the weights with the head Linear divided by ``temperature`` to ``staged``."""
    import torch

    name = head if head is not None else teacher.head
    modules = dict(teacher.model.named_modules())
    linears = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear)]
    if name is None:
        raise BakeError(
            f"{teacher.path}: no nn.Linear produces the model output directly; name the final "
            f"layer with --head (Linear layers: {', '.join(linears[-4:]) or 'none'})"
        )
    layer = modules.get(name) if name else None
    if not isinstance(layer, torch.nn.Linear):
        what = "does not exist" if layer is None else f"is a {type(layer).__name__}, not nn.Linear"
        raise BakeError(
            f"--head {name!r}: {what} in {teacher.path} (Linear layers: "
            f"{', '.join(linears[-4:]) or 'none'})"
        )
    _refuse_tied(teacher, name, layer)
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


def _scale(tensors: dict[str, torch.Tensor], keys: list[str], temperature: float) -> None:
    for key in keys:
        value = tensors[key]
        # Divide in float64 and round once, so fp32 weights are the correctly rounded W / T.
        tensors[key] = (value.double() / temperature).to(value.dtype).contiguous()


def _refuse_tied(teacher: ArchTeacher, name: str, layer: torch.nn.Linear) -> None:
    pointer = layer.weight.data_ptr()
    for other, param in teacher.model.named_parameters(remove_duplicate=False):
        if other != f"{name}.weight" and param.data_ptr() == pointer:
            raise BakeError(
                f"--head {name!r}: its weight is tied to {other} in {teacher.path}; dividing it "
                "would also change that layer: bake the ONNX/torch.export form of the teacher"
            )
