"""ONNX teachers, run with onnxruntime.

Providers are passed explicitly: with ``device="auto"`` the CUDA provider comes first when
onnxruntime offers it and torch sees a GPU, with ``"cuda"``/``"cuda:N"`` it is required. After the
session starts, :attr:`OnnxTeacher.provider` says which provider really runs (onnxruntime falls
back to CPU silently when CUDA libraries are missing); anything worth telling the user lands in
:attr:`OnnxTeacher.notes`. onnxruntime's own logger is set to fatal-only: its errors reach us as
exceptions, which we turn into one-line :class:`TeacherError` messages.

``logits()`` returns float32 (float64 for float64 models) tensors on the CPU.

A graph whose batch dimension is a fixed number (exported without a dynamic batch, often 1) runs
any batch in chunks of that size, the last one padded and its padding's outputs dropped
(:func:`~calibrate_teacher.teachers._batching.run_in_chunks`); the baked model keeps that batch size.
An input whose other fixed dimensions differ is refused with one line before onnxruntime sees it.

A graph with several inputs (``input_ids``, ``attention_mask``...) is fed by name from the batch's
mapping, each input cast to the element type the graph declares (int64 ids, bool masks); see
:mod:`~calibrate_teacher.teachers._inputs`. The bake keeps every input name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from calibrate_teacher._device import check_device
from calibrate_teacher.errors import InputError, TeacherError
from calibrate_teacher.teachers._batching import BatchRows, batch_note, check_input_shape, run_in_chunks
from calibrate_teacher.teachers._files import SUPPORTED, BakedFiles
from calibrate_teacher.teachers._inputs import InputPlan, feed_inputs
from calibrate_teacher.teachers._onnx_graph import (
    FLOAT_TYPES,
    LogitsTensor,
    choose_output,
    drop_unused_initializers,
    external_tensors,
    insert_division,
    merge_external_data,
    real_inputs,
    value_shape,
)
from calibrate_teacher.teachers._torch import (
    as_logits,
    looks_like_probabilities,
    probe_input,
    refuse_probabilities,
)
from calibrate_teacher.teachers.base import Inputs, InputSpec, TeacherFormat

if TYPE_CHECKING:
    import onnx
    import torch

_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"
_DYNAMIC_SIZE = 32  # probe size for a dynamic non-batch dimension (e.g. image height)
_DYNAMIC_BATCH = "re-export it with a dynamic batch (torch.onnx.export dynamic_shapes= or dynamic_axes=)"


def ort_errors() -> tuple[type[Exception], ...]:
    """The exception types onnxruntime raises (Fail, InvalidGraph...): no common base class."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = (
        "Fail",
        "InvalidArgument",
        "NoSuchFile",
        "NoModel",
        "EngineError",
        "RuntimeException",
        "InvalidProtobuf",
        "ModelLoaded",
        "NotImplemented",
        "InvalidGraph",
        "EPFail",
    )
    found = (getattr(state, name, None) for name in names)
    return tuple(c for c in found if isinstance(c, type) and issubclass(c, Exception))


def _installed(distribution: str) -> bool:
    try:
        metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


def distribution_notes() -> list[str]:
    """A note when both onnxruntime distributions are installed (they overwrite each other)."""
    if _installed("onnxruntime") and _installed("onnxruntime-gpu"):
        return [
            "both onnxruntime and onnxruntime-gpu are installed and overwrite each other's files; "
            "keep one: pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"
        ]
    return []


class OnnxTeacher:
    """A :class:`Teacher` over an onnxruntime session.

    Attributes:
        input_specs: Every graph input (name, shape, dtype), in the graph's order; a model with
            several is fed by name from the batch's mapping (see
            :mod:`~calibrate_teacher.teachers._inputs`).
        provider: The execution provider that really runs the model.
        output: The graph output read as the teacher's output.
        logits_tensor: Where the logits are read (the softmax input when the graph ends in one).
        notes: Things the CLI prints on stderr (provider fallback, duplicate onnxruntime,
            batch fields the model does not take).
    """

    format: TeacherFormat = "onnx"

    def __init__(
        self,
        path: Path,
        session: Any,
        info: LogitsTensor,
        specs: Sequence[InputSpec],
        provider: str,
        device: str,
        notes: list[str],
    ) -> None:
        self.path = path
        self.input_specs = tuple(specs)
        self.input_spec = self.input_specs[0]
        self.input_names: tuple[str, ...] | None = tuple(str(s.name) for s in self.input_specs)
        # ONNX inputs have no defaults: every one is required.
        self._plan = InputPlan.of(
            self.input_names, dtypes={str(s.name): s.dtype for s in self.input_specs}
        )
        self.provider = provider
        self.device = device
        first = self.input_spec.shape[0] if self.input_spec.shape else None
        #: The batch size the graph is fixed at, as (fewest, most) rows; None for a dynamic batch.
        self.batch_rows: BatchRows | None = (first, first) if first else None
        self.notes = notes + batch_note(path, self.batch_rows, _DYNAMIC_BATCH)
        self.output = info.output
        self.logits_tensor = info.tensor
        self.info = info
        self.precision = FLOAT_TYPES[info.elem_type]
        self._session = session
        last = info.shape[-1] if info.shape else None
        self.num_classes = int(last) if last else int(self.logits(self._probe(1)).shape[1])

    def _run(self, name: str, batch: Inputs) -> torch.Tensor:
        named = feed_inputs(batch, self._plan, where=self.path, notes=self.notes)
        for spec in self.input_specs:
            check_input_shape(named[str(spec.name)], spec, file=self.path, fix=_reshape_hint)
        rows = {k: v.detach().cpu() for k, v in named.items()}
        return run_in_chunks(
            lambda part: self._run_once(name, part), rows, self.batch_rows, file=self.path
        )

    def _run_once(self, name: str, batch: Inputs) -> torch.Tensor:
        import numpy as np
        import torch

        assert isinstance(batch, Mapping)  # _run hands over named inputs
        feed = {
            str(spec.name): batch[str(spec.name)].numpy().astype(np.dtype(spec.dtype), copy=False)
            for spec in self.input_specs
        }
        try:
            (value,) = self._session.run([name], feed)
        except ort_errors() as exc:
            shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in feed.items())
            what = f"shape {tuple(next(iter(feed.values())).shape)}" if len(feed) == 1 else shapes
            raise TeacherError(
                f"{self.path}: onnxruntime failed on a batch of "
                f"{what}: {' '.join(str(exc).split())[:240]}"
            ) from exc
        return torch.from_numpy(value)

    def logits(self, batch: Inputs) -> torch.Tensor:
        """Return float logits ``[n, num_classes]`` on the CPU (the softmax input, if any)."""
        values = as_logits(self._run(self.logits_tensor, batch), file=self.path)
        if self.info.softmax is None and looks_like_probabilities(values):
            raise refuse_probabilities(self.path)
        return values

    def _probabilities(self, batch: Inputs) -> torch.Tensor | None:
        if self.info.softmax is None:
            return None
        return self._run(self.output, batch).float()

    def _probe(self, batch_size: int) -> Inputs:
        made = {str(spec.name): self._probe_input(spec, batch_size) for spec in self.input_specs}
        return made if len(made) > 1 else next(iter(made.values()))

    def _probe_input(self, spec: InputSpec, batch_size: int) -> torch.Tensor:
        import torch

        if not spec.shape:
            raise TeacherError(
                f"{self.path}: the model does not record the shape of its input {spec.name!r}, "
                "so no probe batch can be made; pass probe= to bake_temperature"
            )
        shape = [batch_size if i == 0 else (d or _DYNAMIC_SIZE) for i, d in enumerate(spec.shape)]
        float_like = spec.dtype in FLOAT_TYPES.values()
        zeros = torch.zeros(shape, dtype=torch.float32 if float_like else torch.int64)
        return probe_input(str(spec.name), zeros, batch_size)


def _reshape_hint(dims: Sequence[int]) -> str:
    return (
        f"re-export it with dimension(s) {', '.join(map(str, dims))} dynamic (torch.onnx.export "
        "dynamic_shapes= or dynamic_axes=)"
    )


def read_model(path: Path) -> onnx.ModelProto:
    """Parse the model without its external weights; one-line errors for anything else."""
    import onnx
    from google.protobuf.message import DecodeError  # type: ignore[import-untyped, unused-ignore]

    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise InputError(f"{path}: not a valid ONNX model ({exc}); {SUPPORTED}") from exc
    if not model.graph.node or not model.graph.output:
        raise InputError(f"{path}: not a valid ONNX model (the graph is empty); {SUPPORTED}")
    return model


def _providers(device: str, path: Path) -> list[Any]:
    import onnxruntime as ort

    check_device(device)
    available = ort.get_available_providers()
    if device == "cpu":
        return [_CPU]
    if device == "auto":
        import torch

        use_cuda = _CUDA in available and torch.cuda.is_available()
        return [(_CUDA, {"device_id": 0}), _CPU] if use_cuda else [_CPU]
    if _CUDA not in available:
        raise TeacherError(
            f"{path}: --device {device} asked for CUDA but this onnxruntime has no "
            "CUDAExecutionProvider; pip install onnxruntime-gpu (and uninstall "
            "onnxruntime)"
        )
    index = int(device.partition(":")[2] or 0)
    return [(_CUDA, {"device_id": index}), _CPU]


def load(
    path: Path,
    *,
    device: str,
    output: str | None,
    arch: str | None,
    arch_kwargs: Mapping[str, object] | str | None,
) -> OnnxTeacher:
    """Open an onnxruntime session for the model at ``path``; see the module docstring."""
    import onnxruntime as ort
    from onnx import helper

    model = read_model(path)
    external_tensors(model, path.parent)  # before onnxruntime follows any location
    inputs = real_inputs(model)
    if not inputs:
        raise TeacherError(f"{path}: the model takes no inputs; a teacher needs at least one")
    specs = [
        InputSpec(
            name=value.name,
            shape=value_shape(value) or (),
            dtype=str(helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)),
        )
        for value in inputs
    ]
    info = choose_output(model, output, file=path)
    notes = distribution_notes()
    if arch:
        notes.append(f"--arch ignored: {path.name} is ONNX and carries its own graph")
    providers = _providers(device, path)
    ort.set_default_logger_severity(4)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    source: str | bytes = str(path)
    if info.tensor not in {o.name for o in model.graph.output}:
        # Expose the pre-softmax tensor as an extra output; the weights stay where they are.
        model.graph.output.append(helper.make_tensor_value_info(info.tensor, info.elem_type, None))
        source = model.SerializeToString()
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(path.parent.resolve())
        )
    try:
        session = ort.InferenceSession(source, options, providers=providers)
    except ort_errors() as exc:
        raise TeacherError(
            f"{path}: onnxruntime cannot load the model: {' '.join(str(exc).split())[:300]}"
        ) from exc
    running = session.get_providers()[0]
    wanted = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
    where = "cpu"
    if running == _CUDA:
        where = f"cuda:{providers[0][1]['device_id']}"
    elif wanted == _CUDA and device != "auto":
        raise TeacherError(
            f"{path}: --device {device} asked for CUDA but onnxruntime could not "
            "start CUDAExecutionProvider (CUDA/cuDNN libraries missing or "
            "mismatched); fix the CUDA install or use --device cpu"
        )
    elif wanted == _CUDA:
        notes.append(
            "onnxruntime could not start CUDAExecutionProvider (CUDA/cuDNN libraries "
            "missing or mismatched); running the teacher on CPU"
        )
    return OnnxTeacher(path, session, info, specs, running, where, notes)


def bake(teacher: OnnxTeacher, temperature: float, staged: Path, *, head: str | None) -> BakedFiles:
    """Write the model with ``Div`` by T on its logits to ``staged`` (+ merged external data)."""
    import onnx

    model = read_model(teacher.path)
    insert_division(model, teacher.logits_tensor, temperature, teacher.info.elem_type)
    drop_unused_initializers(model)
    extra: tuple[Path, ...] = ()
    if external_tensors(model, teacher.path.parent):
        data = staged.with_name(staged.name + ".data")
        merge_external_data(model, teacher.path.parent, data)
        extra = (data,)
    onnx.save(model, str(staged))
    return BakedFiles(staged, extra, head=teacher.logits_tensor)
