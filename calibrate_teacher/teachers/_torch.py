"""What the three PyTorch backends share: running a module, picking its logits, probing it.

TorchScript, torch.export and safetensors + architecture teachers are all "a callable that takes
one tensor, or the mapping of its named inputs"; :class:`ModuleTeacher` turns such a callable into
a :class:`Teacher`. Outputs may be a tensor, a tuple/list (``--output 1`` picks an index) or a
mapping (``--output NAME``, default ``logits``, as Hugging Face models return). A model with one
input takes one unnamed tensor (``input_names`` is None; a mapping batch gives it its one entry,
see :func:`~calibrate_teacher.teachers.base.single_input`); a model with several has
``input_names`` and is fed by name (:mod:`~calibrate_teacher.teachers._inputs`).

A model that runs only on some batch sizes gets ``batch_rows`` and runs in chunks, and a teacher
that records its input shape refuses other shapes with one line: both are in
:mod:`~calibrate_teacher.teachers._batching`.

For in-memory models (:mod:`~calibrate_teacher.teachers._memory`), :func:`pick_logits` also reads
an attribute (``ModelOutput.logits``) or an int index, and :func:`divide_logits` returns the
output with its logits divided by T and every other entry kept.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from calibrate_teacher.errors import TeacherError
from calibrate_teacher.teachers._batching import BatchRows, check_input_shape, run_in_chunks
from calibrate_teacher.teachers._inputs import InputPlan, feed_inputs
from calibrate_teacher.teachers.base import Inputs, InputSpec, TeacherFormat, single_input

if TYPE_CHECKING:
    import torch

#: A model call: one tensor in, or (a multi-input model) the mapping of its named inputs.
ModuleFn = Callable[[Inputs], object]
#: Which entry of an in-memory model's output holds the logits: a key, an attribute, an index.
Output = str | int | None
_Where = tuple[Literal["self", "key", "index", "attr"], object]

#: Spatial sizes tried, in order, when the input size must be guessed from the first layer.
_IMAGE_SIZES = (32, 224, 28, 64, 96, 299)
_PROBE_SEED = 0


def select_output(out: object, output: str | None, *, file: Path) -> torch.Tensor:
    """Pick the logits tensor from whatever the model returned."""
    import torch

    if isinstance(out, torch.Tensor):
        if output not in (None, "0"):
            raise TeacherError(
                f"{file}: --output {output!r} given but the model returns one tensor"
            )
        return out
    if isinstance(out, Mapping):
        key = output if output is not None else "logits"
        if key not in out:
            keys = ", ".join(map(str, out))
            raise TeacherError(
                f"{file}: the model returns a mapping without {key!r} ({keys}); "
                "pick one with --output NAME"
            )
        value = out[key]
    elif isinstance(out, Sequence) and not isinstance(out, str) and len(out) > 0:
        index = 0 if output is None else _index(output, len(out), file)
        value = out[index]
    else:
        raise TeacherError(f"{file}: the model returns {type(out).__name__}, not a tensor")
    if not isinstance(value, torch.Tensor):
        raise TeacherError(f"{file}: the selected output is {type(value).__name__}, not a tensor")
    return value


def _index(output: str, length: int, file: Path) -> int:
    if not output.lstrip("-").isdigit() or not -length <= int(output) < length:
        raise TeacherError(
            f"{file}: the model returns {length} outputs; --output takes an index "
            f"0..{length - 1}, got {output!r}"
        )
    return int(output)


def looks_like_probabilities(values: torch.Tensor) -> bool:
    """True when every row is non-negative and sums to 1 (a softmax output, not logits)."""
    if values.ndim != 2 or values.shape[0] == 0 or values.shape[1] < 2:
        return False
    v = values.detach().double()
    return bool((v >= 0).all()) and bool(((v.sum(dim=1) - 1).abs() <= 1e-3).all())


def as_logits(values: torch.Tensor, *, file: Path, fix: str = "pick another with --output") -> torch.Tensor:
    """Check a [n, C] float output and widen half precision to float32."""
    import torch

    if values.ndim != 2 or not values.is_floating_point():
        raise TeacherError(
            f"{file}: expected float logits of shape [n, C], the model returned "
            f"{values.dtype} {tuple(values.shape)}; {fix}"
        )
    if values.dtype in (torch.float16, torch.bfloat16):
        values = values.float()
    return values


def refuse_probabilities(file: Path) -> TeacherError:
    """The error for a model whose output is probabilities with no pre-softmax tensor in sight."""
    return TeacherError(
        f"{file}: the output rows are non-negative and sum to 1, so they are probabilities, and no "
        "pre-softmax tensor could be located; calibrating them as logits would be wrong: export "
        "the model without its final softmax (or with an nn.Softmax module / ONNX Softmax node)"
    )


class ModuleTeacher:
    """A :class:`Teacher` over a callable PyTorch model (TorchScript, export, eager).

    ``logits()`` moves the batch to :attr:`device` (cast to :attr:`input_dtype` when both are
    floating point) and returns float logits on :attr:`device` (float32 for half models).

    A model with several inputs has a ``plan`` (:class:`~calibrate_teacher.teachers._inputs.InputPlan`):
    it is fed by name from the batch's mapping, and ``fn`` is called with the mapping of its
    inputs (each backend turns that into its own call: keywords, or the program's positions).
    """

    def __init__(
        self,
        path: Path,
        fmt: TeacherFormat,
        fn: ModuleFn,
        *,
        device: str,
        output: str | None,
        input_dtype: torch.dtype | None,
        sample: Inputs,
        logits_fn: ModuleFn | None = None,
        input_spec: InputSpec | None = None,
        notes: list[str] | None = None,
        batch_rows: BatchRows | None = None,
        plan: InputPlan | None = None,
        input_specs: Sequence[InputSpec] = (),
    ) -> None:
        self.path = path
        self.format: TeacherFormat = fmt
        self.device = device
        self.output = output
        self.input_dtype = input_dtype
        self.input_specs: tuple[InputSpec, ...] = tuple(input_specs) or (
            (input_spec,) if input_spec is not None else ()
        )
        self.input_spec = input_spec if input_spec is not None else next(iter(self.input_specs), None)
        #: The model's input names when it takes several (fed by name); None for one tensor.
        self.input_names: tuple[str, ...] | None = plan.names if plan is not None else None
        self.notes = notes if notes is not None else []
        #: The batch sizes the model runs on (None: any); other batches run in chunks.
        self.batch_rows = batch_rows
        self._plan = plan
        self._fn = fn
        # When the model ends in a softmax we can see, logits_fn returns its input (the logits
        # tensor itself, already selected) and fn's output is the probabilities.
        self._logits_fn = logits_fn
        self._sample = sample
        self._loading = True  # the load-time sample is ours: nothing to note about its fields
        raw = self._raw(sample)
        self._loading = False
        self.precision = str(raw.dtype).removeprefix("torch.")
        self.num_classes = int(self._checked(raw).shape[1])

    def _move(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        if (
            self.input_dtype is not None
            and self.input_dtype.is_floating_point
            and x.is_floating_point()
        ):
            x = x.to(self.input_dtype)
        return x

    def _run(self, fn: ModuleFn, batch: Inputs, *, select: bool = True) -> torch.Tensor:
        import torch

        x: Inputs
        if self._plan is not None:
            notes = [] if self._loading else self.notes
            named = feed_inputs(batch, self._plan, where=self.path, notes=notes)
            x = {k: self._move(v) for k, v in named.items()}
            for spec in self.input_specs:
                if spec.name in x:
                    check_input_shape(x[spec.name], spec, file=self.path, fix=self._reshape_hint)
        else:
            x = self._move(single_input(batch, name=None, where=self.path))
            check_input_shape(x, self.input_spec, file=self.path, fix=self._reshape_hint)

        def chunk(rows: Inputs) -> torch.Tensor:
            with torch.inference_mode():
                out = fn(rows)
            if not select and isinstance(out, torch.Tensor):
                return out
            return select_output(out, self.output, file=self.path)

        return run_in_chunks(chunk, x, self.batch_rows, file=self.path)

    def _reshape_hint(self, dims: Sequence[int]) -> str:
        """How to make the model take other sizes in ``dims`` (appended to the shape error)."""
        return f"export the model with dimension(s) {', '.join(map(str, dims))} dynamic"

    def _raw(self, batch: Inputs) -> torch.Tensor:
        if self._logits_fn is not None:
            return self._run(self._logits_fn, batch, select=False)
        return self._run(self._fn, batch)

    def _checked(self, raw: torch.Tensor) -> torch.Tensor:
        values = as_logits(raw, file=self.path)
        if self._logits_fn is None and looks_like_probabilities(values):
            raise refuse_probabilities(self.path)
        return values

    def logits(self, batch: Inputs) -> torch.Tensor:
        """Return the pre-softmax logits ``[n, num_classes]`` on :attr:`device`."""
        return self._checked(self._raw(batch))

    def _probabilities(self, batch: Inputs) -> torch.Tensor | None:
        if self._logits_fn is None:
            return None
        return self._run(self._fn, batch).float()

    def _probe(self, batch_size: int) -> Inputs:
        return expand_inputs(self._sample, batch_size)


def expand_sample(sample: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Deterministic random inputs shaped like ``sample`` with ``batch_size`` rows."""
    import torch

    gen = torch.Generator().manual_seed(_PROBE_SEED)
    shape = (batch_size, *sample.shape[1:])
    if sample.is_floating_point():
        return torch.randn(shape, generator=gen).to(sample.dtype)
    high = max(int(sample.max()) + 1, 2) if sample.numel() else 2
    return torch.randint(0, high, shape, generator=gen, dtype=sample.dtype)


def probe_input(name: str, sample: torch.Tensor, batch_size: int) -> torch.Tensor:
    """A probe for the input called ``name``: :func:`expand_sample`, but a mask is all ones.

    An integer or bool mask of random 0/1 could leave a row with no token at all.
    """
    import torch

    if "mask" in name and not sample.is_floating_point():
        return torch.ones((batch_size, *sample.shape[1:]), dtype=sample.dtype)
    return expand_sample(sample, batch_size)


def one_named(run: ModuleFn, name: str) -> ModuleFn:
    """``run`` given one tensor as the named input ``name`` (to guess that input's shape)."""

    def call(x: Inputs) -> object:
        return run({name: x} if not isinstance(x, Mapping) else x)

    return call


def expand_inputs(sample: Inputs, batch_size: int) -> Inputs:
    """:func:`expand_sample` for one tensor, :func:`probe_input` for each named input."""
    if isinstance(sample, Mapping):
        return {k: probe_input(k, v, batch_size) for k, v in sample.items()}
    return expand_sample(sample, batch_size)


def guess_named_sample(
    module: torch.nn.Module, plan: InputPlan, run: ModuleFn, *, file: Path
) -> dict[str, torch.Tensor]:
    """Find named inputs a multi-input model accepts (a TorchScript file records no shapes).

    Only a model whose first layer is an ``nn.Embedding`` (a text model) is guessed: every
    required input becomes int64 ``[2, 8]``, ids ``1`` and masks ones.

    Raises:
        TeacherError: another first layer, or the guess does not run.
    """
    import torch

    first = next(
        (
            (name, getattr(sub, "original_name", type(sub).__name__), sub)
            for name, sub in module.named_modules()
            if isinstance(getattr(sub, "weight", None), torch.Tensor)
        ),
        None,
    )
    reason = "no first layer with weights"
    if first is not None and first[1] == "Embedding":
        vocab = int(first[2].weight.shape[0])
        sample = {
            n: torch.ones((2, 8), dtype=torch.long) * (1 if "mask" in n else min(vocab, 2) - 1)
            for n in plan.required
        }
        try:
            with torch.inference_mode():
                run(sample)
        except (RuntimeError, ValueError, IndexError, TypeError) as exc:
            reason = f"int64 (2, 8) inputs fail: {str(exc).splitlines()[0][:80]}"
        else:
            return sample
    elif first is not None:
        reason = f"first layer {first[0] or 'the model'} ({first[1]})"
    raise TeacherError(
        f"{file}: cannot work out the shapes of its inputs {', '.join(plan.names)} to probe the "
        f"model ({reason}); save it as ONNX or torch.export, which record their input shapes"
    )


def guess_sample(module: torch.nn.Module, run: ModuleFn, *, file: Path) -> torch.Tensor:
    """Find an input the model accepts, from the type and shape of its first layer.

    TorchScript files and bare state dicts do not record their input shape, so we read the
    first Conv/Linear/Embedding layer and try the preprocessing sidecar's ``input_size`` (when
    there is one beside the model), then common sizes (32, 224, 28, 64, 96, 299 pixels).

    Raises:
        TeacherError: no first layer we recognise, or no tried size runs.
    """
    import torch

    from calibrate_teacher.teachers._preprocessing import sidecar_input_size

    candidates: list[torch.Tensor] = []
    first = "none"
    hint = sidecar_input_size(file)  # the preprocessing sidecar's (C, H, W), when there is one
    for name, sub in module.named_modules():
        kind = getattr(sub, "original_name", type(sub).__name__)
        weight = getattr(sub, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        first = f"{name or 'the model'} ({kind})"
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        if kind in ("Conv1d", "Conv2d", "Conv3d") and weight.ndim >= 3:
            groups = int(getattr(sub, "groups", 1))
            channels = int(weight.shape[1]) * groups
            spatial = weight.ndim - 2
            if hint is not None and spatial == 2 and hint[0] == channels:
                candidates.append(torch.zeros((2, *hint), dtype=dtype))
            for size in _IMAGE_SIZES if spatial == 2 else (64, 16, 224):
                candidates.append(torch.zeros((2, channels, *([size] * spatial)), dtype=dtype))
        elif kind == "Linear" and weight.ndim == 2:
            candidates.append(torch.zeros((2, int(weight.shape[1])), dtype=dtype))
        elif kind == "Embedding" and weight.ndim == 2:
            candidates.append(
                torch.zeros((2, 8), dtype=torch.long) + min(int(weight.shape[0]), 2) - 1
            )
        break
    failures: list[str] = []
    for sample in candidates:
        try:
            with torch.inference_mode():
                run(sample)
        except (RuntimeError, ValueError, IndexError, TypeError) as exc:
            failures.append(f"{tuple(sample.shape)}: {str(exc).splitlines()[0][:80]}")
            continue
        return expand_sample(sample, 2)
    tried = "; ".join(failures) if failures else "no input shape could be derived"
    raise TeacherError(
        f"{file}: cannot work out the input shape to probe the model (first layer: {first}; "
        f"{tried}); save it as ONNX or torch.export, which record their input shape"
    )


# --- in-memory models: the logits in any output, and dividing them in place of the original ---


def _locate(out: object, output: Output, where: Path) -> _Where:
    """How to reach the logits in ``out``: the value itself, a key, an index or an attribute."""
    import torch

    hint = "pick one with output=KEY or output=INDEX"
    if isinstance(out, torch.Tensor):
        if output not in (None, 0, "0"):
            raise TeacherError(f"{where}: output={output!r} given but the model returns one tensor")
        return "self", None
    if isinstance(out, Mapping):
        keys = list(out)
        if isinstance(output, int) or (output not in keys and str(output).lstrip("-").isdigit()):
            return "key", keys[_output_index(int(str(output)), len(keys), where)]
        key = "logits" if output is None else output
        if key not in out:
            raise TeacherError(
                f"{where}: the model returns a mapping without {key!r} "
                f"({', '.join(map(str, keys))}); {hint}"
            )
        return "key", key
    name = "logits" if output is None else output
    if isinstance(name, str) and not name.lstrip("-").isdigit() and hasattr(out, name):
        return "attr", name
    if isinstance(out, Sequence) and not isinstance(out, str | bytes) and len(out) > 0:
        if output is None:
            return "index", 0
        if isinstance(output, int) or output.lstrip("-").isdigit():
            return "index", _output_index(int(output), len(out), where)
        raise TeacherError(f"{where}: output={output!r} names no entry of the {type(out).__name__}; {hint}")
    raise TeacherError(
        f"{where}: the model returns {type(out).__name__}, not a tensor, tuple, mapping or "
        "object with logits; return the logits or pick them with output="
    )


def _output_index(index: int, length: int, where: Path) -> int:
    if not -length <= index < length:
        raise TeacherError(
            f"{where}: the model returns {length} outputs; output= takes an index 0..{length - 1}, "
            f"got {index}"
        )
    return index % length


def _get(out: object, at: _Where) -> object:
    kind, key = at
    if kind == "self":
        return out
    if kind == "attr":
        return getattr(out, str(key))
    if kind == "key":
        return out[key]  # type: ignore[index]  # _locate saw a Mapping
    return out[int(str(key))]  # type: ignore[index]  # _locate saw a Sequence


def pick_logits(out: object, output: Output, *, where: Path) -> torch.Tensor:
    """The logits tensor in whatever the model returned.

    Raises:
        TeacherError: no such entry, or the entry is not a tensor.
    """
    import torch

    value = _get(out, _locate(out, output, where))
    if not isinstance(value, torch.Tensor):
        raise TeacherError(
            f"{where}: the selected output is {type(value).__name__}, not a tensor; pick the "
            "logits with output="
        )
    return value


def divide_logits(out: object, temperature: float, output: Output, *, where: Path) -> object:
    """``out`` with its logits divided by ``temperature``, every other entry kept as it is."""
    at = _locate(out, output, where)
    scaled = pick_logits(out, output, where=where) / temperature
    kind, key = at
    if kind == "self":
        return scaled
    if kind == "key":
        if isinstance(out, dict):  # dict, OrderedDict, ModelOutput: keep the type
            mapping = copy.copy(out)
            mapping[key] = scaled
            return mapping
        return {**out, key: scaled}  # type: ignore[dict-item]  # _locate saw a Mapping
    if kind == "attr":
        if isinstance(out, tuple) and hasattr(out, "_replace"):  # a namedtuple
            return out._replace(**{str(key): scaled})
        if dataclasses.is_dataclass(out) and not isinstance(out, type):
            return dataclasses.replace(out, **{str(key): scaled})
        new = copy.copy(out)
        setattr(new, str(key), scaled)
        return new
    items = list(out)  # type: ignore[call-overload]  # _locate saw a Sequence
    items[int(str(key))] = scaled
    if isinstance(out, tuple) and hasattr(out, "_make"):  # a namedtuple
        return out._make(items)
    return type(out)(items)  # type: ignore[call-arg]  # tuple or list
