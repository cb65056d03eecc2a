"""What the three PyTorch backends share: running a module, picking its logits, probing it.

TorchScript, torch.export and safetensors + architecture teachers are all "a callable that takes
one tensor"; :class:`ModuleTeacher` turns such a callable into a :class:`Teacher`. Outputs may be
a tensor, a tuple/list (``--output 1`` picks an index) or a mapping (``--output NAME``, default
``logits``, as Hugging Face models return).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from calibrate_teacher.errors import TeacherError
from calibrate_teacher.teachers.base import InputSpec, TeacherFormat

if TYPE_CHECKING:
    import torch

ModuleFn = Callable[["torch.Tensor"], object]

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


def as_logits(values: torch.Tensor, *, file: Path) -> torch.Tensor:
    """Check a [n, C] float output and widen half precision to float32."""
    import torch

    if values.ndim != 2 or not values.is_floating_point():
        raise TeacherError(
            f"{file}: expected float logits of shape [n, C], the model returned "
            f"{values.dtype} {tuple(values.shape)}; pick another with --output"
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
        sample: torch.Tensor,
        logits_fn: ModuleFn | None = None,
        input_spec: InputSpec | None = None,
        notes: list[str] | None = None,
    ) -> None:
        self.path = path
        self.format: TeacherFormat = fmt
        self.device = device
        self.output = output
        self.input_dtype = input_dtype
        self.input_spec = input_spec
        self.notes = notes if notes is not None else []
        self._fn = fn
        # When the model ends in a softmax we can see, logits_fn returns its input (the logits
        # tensor itself, already selected) and fn's output is the probabilities.
        self._logits_fn = logits_fn
        self._sample = sample
        raw = self._raw(sample)
        self.precision = str(raw.dtype).removeprefix("torch.")
        self.num_classes = int(self._checked(raw).shape[1])

    def _run(self, fn: ModuleFn, batch: torch.Tensor, *, select: bool = True) -> torch.Tensor:
        import torch

        x = batch.to(self.device)
        if (
            self.input_dtype is not None
            and self.input_dtype.is_floating_point
            and x.is_floating_point()
        ):
            x = x.to(self.input_dtype)
        with torch.inference_mode():
            out = fn(x)
        if not select and isinstance(out, torch.Tensor):
            return out
        return select_output(out, self.output, file=self.path)

    def _raw(self, batch: torch.Tensor) -> torch.Tensor:
        if self._logits_fn is not None:
            return self._run(self._logits_fn, batch, select=False)
        return self._run(self._fn, batch)

    def _checked(self, raw: torch.Tensor) -> torch.Tensor:
        values = as_logits(raw, file=self.path)
        if self._logits_fn is None and looks_like_probabilities(values):
            raise refuse_probabilities(self.path)
        return values

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Return the pre-softmax logits ``[n, num_classes]`` on :attr:`device`."""
        return self._checked(self._raw(batch))

    def _probabilities(self, batch: torch.Tensor) -> torch.Tensor | None:
        if self._logits_fn is None:
            return None
        return self._run(self._fn, batch).float()

    def _probe(self, batch_size: int) -> torch.Tensor:
        return expand_sample(self._sample, batch_size)


def expand_sample(sample: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Deterministic random inputs shaped like ``sample`` with ``batch_size`` rows."""
    import torch

    gen = torch.Generator().manual_seed(_PROBE_SEED)
    shape = (batch_size, *sample.shape[1:])
    if sample.is_floating_point():
        return torch.randn(shape, generator=gen).to(sample.dtype)
    high = max(int(sample.max()) + 1, 2) if sample.numel() else 2
    return torch.randint(0, high, shape, generator=gen, dtype=sample.dtype)


def guess_sample(module: torch.nn.Module, run: ModuleFn, *, file: Path) -> torch.Tensor:
    """Find an input the model accepts, from the type and shape of its first layer.

    TorchScript files and bare state dicts do not record their input shape, so we read the
    first Conv/Linear/Embedding layer and try the preprocessing sidecar's ``input_size`` (when
    there is one beside the model), then common sizes (32, 224, 28, 64, 96, 299 pixels).

    Raises:
        TeacherError: no first layer we recognise, or no tried size runs.
    """
    import torch

    from calibrate_teacher.data.preprocess import sidecar_input_size

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
