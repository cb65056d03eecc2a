"""ONNX detection teachers: ultralytics YOLOv8/v11, YOLOX/YOLOv5-style and named box/score outputs.

Layouts (``OnnxDetectionTeacher.layout``):

* ``ultralytics``: one output ``[B, 4 + C, N]``: rows ``cx, cy, w, h`` (input pixels), then C
  class scores that a ``Sigmoid`` made (``Detect._inference``: ``cat((dbox, cls.sigmoid()), 1)``).
* ``yolox``: one output ``[B, N, 5 + C]`` (``cx, cy, w, h``, sigmoid objectness, sigmoid classes),
  as YOLOX and YOLOv5 export; ``[B, N, 4 + C]`` (no objectness) when the ``names`` metadata
  says there are C classes.
* ``named``: ``boxes_output`` ``[B, N, 4]`` (xyxy, input pixels) and ``scores_output``
  ``[B, N, K]`` ending in a ``Sigmoid`` (sigmoid head, K = C) or a ``Softmax`` over the last axis
  (softmax head, K = C + 1, ``background`` must be given).

The logits are read from the graph, never inferred from the scores: the Sigmoids behind the
output are skipped in an added copy of its layout path (:mod:`._onnx_bypass`), the input of a
final Softmax is added as an output. An output whose scores come from no visible Sigmoid or
Softmax is refused: its logits cannot be recovered. Which elements are boxes, objectness and
class logits is checked on a probe batch when the model loads (the copy differs from the
original exactly where a Sigmoid was skipped, and there ``sigmoid(copy) == original``).

Class names come from ultralytics' ``names`` metadata (a Python dict literal, read with
``ast.literal_eval`` after a check that it is one), the input size from the graph or, where
its height/width are dynamic, the ``imgsz`` metadata. Providers, the CUDA fallback and the
external-data checks are those of :mod:`calibrate_teacher.teachers._onnx`.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from calibrate_teacher.detection._onnx_layout import GraphReading, read_graph, settle_layout
from calibrate_teacher.detection.base import BackgroundLayout, Detections, HeadKind
from calibrate_teacher.errors import InvalidValueError, TeacherError
from calibrate_teacher.teachers._batching import BatchRows, batch_note, run_in_chunks
from calibrate_teacher.teachers._onnx import (
    _CUDA,
    _providers,
    distribution_notes,
    ort_errors,
    read_model,
)
from calibrate_teacher.teachers._onnx_graph import (
    external_tensors,
    real_inputs,
    value_shape,
)
from calibrate_teacher.teachers.base import InputSpec

if TYPE_CHECKING:
    import onnx
    import torch

_DEFAULT_SIZE = 640  # ultralytics' default imgsz, for a dynamic input with no imgsz metadata
_NAMES = re.compile(r"^\s*[\[{][\s\S]*[\]}]\s*$")


class OnnxDetectionTeacher:
    """A :class:`~calibrate_teacher.detection.base.DetectionTeacher` over onnxruntime."""

    format = "onnx"

    def __init__(
        self,
        path: Path,
        session: Any,
        reading: GraphReading,
        spec: InputSpec,
        *,
        num_classes: int,
        background: BackgroundLayout,
        class_names: tuple[str, ...] | None,
        image_size: tuple[int, int],
        provider: str,
        device: str,
        notes: list[str],
    ) -> None:
        self.path = path
        self.reading = reading
        self.layout = reading.layout
        self.head: HeadKind = reading.head
        self.background: BackgroundLayout = background
        self.num_classes = num_classes
        self.class_names = class_names
        self.input_spec: InputSpec | None = spec
        #: Height and width of the probe / expected input (graph, else ``imgsz`` metadata).
        self.image_size = image_size
        self.provider = provider
        self.device = device
        first = spec.shape[0] if spec.shape else None
        self.batch_rows: BatchRows | None = (first, first) if first else None
        self.notes = notes + batch_note(path, self.batch_rows, "re-export it with dynamic=True")
        self._session = session

    def run(self, names: list[str], images: torch.Tensor) -> list[torch.Tensor]:
        """Run graph outputs ``names`` on ``images`` (CPU float tensors), in chunks if needed."""
        import torch

        widths: list[tuple[int, ...]] = []

        def once(rows: Any) -> torch.Tensor:
            x = rows.numpy().astype("float32" if self.input_spec is None else self.input_spec.dtype, copy=False)
            try:
                values = self._session.run(names, {self.input_spec.name if self.input_spec else "": x})
            except ort_errors() as exc:
                raise TeacherError(
                    f"{self.path}: onnxruntime failed on a batch of shape {tuple(x.shape)}: "
                    f"{' '.join(str(exc).split())[:240]}"
                ) from exc
            tensors = [torch.from_numpy(v).float() for v in values]
            widths[:] = [tuple(t.shape[1:]) for t in tensors]
            return torch.cat([t.reshape(t.shape[0], -1) for t in tensors], dim=1)

        flat = run_in_chunks(once, images.detach().cpu().float(), self.batch_rows, file=self.path)
        out, start = [], 0
        for shape in widths:
            size = 1
            for d in shape:
                size *= d
            out.append(flat[:, start : start + size].reshape(flat.shape[0], *shape))
            start += size
        return out

    def detect(self, images: torch.Tensor) -> list[Detections]:
        """Candidate boxes (xyxy, input pixels) with class logits, one entry per image."""
        r = self.reading
        if r.layout == "named":
            assert r.boxes_output is not None
            boxes, logits = self.run([r.boxes_output, r.logits_output], images)
            return [
                Detections(boxes[i].contiguous(), logits[i].contiguous(), self.head, self.background)
                for i in range(boxes.shape[0])
            ]
        (values,) = self.run([r.logits_output], images)
        if r.layout == "ultralytics":
            values = values.transpose(1, 2)  # [B, N, 4 + C]
        out = []
        for v in values:
            first = 5 if r.objectness else 4
            out.append(
                Detections(
                    boxes=xywh_to_xyxy(v[:, :4]),
                    logits=v[:, first:].contiguous(),
                    head="sigmoid",
                    background="none",
                    objectness=v[:, 4].contiguous() if r.objectness else None,
                )
            )
        return out


def xywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    """``cx, cy, w, h`` -> ``x1, y1, x2, y2``."""
    import torch

    half = b[:, 2:] / 2
    return torch.cat([b[:, :2] - half, b[:, :2] + half], dim=1)


def parse_names(text: str) -> tuple[str, ...] | None:
    """Class names from ultralytics' ``names`` metadata (``"{0: 'person', ...}"`` or a list).

    Only a dict literal of consecutive int keys from 0 to str values, or a list of str, is
    accepted (``ast.literal_eval`` never runs code; the shape is checked after); else None.

    >>> parse_names("{0: 'person', 1: 'bicycle'}")
    ('person', 'bicycle')
    """
    if len(text) > 1_000_000 or not _NAMES.match(text):
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
        # int keys (ultralytics) or decimal-string keys (some YOLOv5 forks); bools are refused
        keys: list[int] = []
        for key in value:
            if type(key) is int:
                keys.append(key)
            elif isinstance(key, str) and key.isdecimal():
                keys.append(int(key))
            else:
                return None
        if sorted(keys) == list(range(len(keys))):
            by_index = dict(zip(keys, value.values(), strict=True))
            return tuple(by_index[k] for k in range(len(keys)))
    return None


def parse_imgsz(text: str) -> tuple[int, int] | None:
    """``imgsz`` metadata (``"[640, 640]"`` or ``"640"``) as (height, width), else None.

    >>> parse_imgsz("[384, 640]")
    (384, 640)
    """
    numbers = [int(n) for n in re.findall(r"\d+", text)] if re.fullmatch(r"[\s\[\](),\d]+", text) else []
    if len(numbers) == 1:
        return numbers[0], numbers[0]
    if len(numbers) == 2 and all(n > 0 for n in numbers):
        return numbers[0], numbers[1]
    return None


def load(
    path: Path,
    *,
    device: str,
    head: HeadKind | None,
    background: BackgroundLayout | None,
    boxes_output: str | None,
    scores_output: str | None,
) -> OnnxDetectionTeacher:
    """Open an onnxruntime session over the detector at ``path``; see the module docstring."""
    from onnx import helper

    model = read_model(path)
    external_tensors(model, path.parent)  # before onnxruntime follows any location
    inputs = real_inputs(model)
    if len(inputs) != 1:
        raise TeacherError(
            f"{path}: the model takes {len(inputs)} inputs; detectors with one image input are supported"
        )
    meta = {p.key: p.value for p in model.metadata_props}
    notes = distribution_notes()
    names = parse_names(meta["names"]) if "names" in meta else None
    if "names" in meta and names is None:
        notes.append(f"{path.name}: its 'names' metadata is not a dict of class names; ignored")
    spec = InputSpec(
        name=inputs[0].name,
        shape=value_shape(inputs[0]) or (),
        dtype=str(helper.tensor_dtype_to_np_dtype(inputs[0].type.tensor_type.elem_type)),
    )
    size = _image_size(spec, meta, path, notes)
    reading, model = read_graph(model, file=path, boxes_output=boxes_output, scores_output=scores_output, head=head)
    session, running, where = _session(model, path, device, notes)
    layout_bg = _background(reading.head, background, path)
    teacher = OnnxDetectionTeacher(
        path, session, reading, spec, num_classes=0, background=layout_bg, class_names=names,
        image_size=size, provider=running, device=where, notes=notes,
    )  # fmt: skip
    probe = probe_images(2 if teacher.batch_rows is None else teacher.batch_rows[0], size)
    original, copy = teacher.run([reading.output, reading.logits_output], probe)
    if reading.head == "sigmoid":
        teacher.reading = teacher_reading = settle_layout(reading, original, copy, names=names, file=path)
        teacher.layout = teacher_reading.layout
    width = teacher.detect(probe)[0].logits.shape[1]
    teacher.num_classes = width - 1 if teacher.head == "softmax" else width
    if names is not None and len(names) != teacher.num_classes:
        notes.append(
            f"{path.name}: 'names' lists {len(names)} classes but the model scores {teacher.num_classes}; names ignored"
        )
        teacher.class_names = None
    return teacher


def _background(kind: HeadKind, background: BackgroundLayout | None, path: Path) -> BackgroundLayout:
    if kind == "sigmoid":
        if background not in (None, "none"):
            raise InvalidValueError(
                f"{path}: background={background!r} but it is a sigmoid head (no background column)"
            )
        return "none"
    if background not in ("first", "last"):
        raise InvalidValueError(
            f"{path}: a softmax head over C + 1 columns; say where the background column is with "
            "background='first' (torchvision) or 'last' (detectron2)"
        )
    return background


def _image_size(spec: InputSpec, meta: dict[str, str], path: Path, notes: list[str]) -> tuple[int, int]:
    dims = spec.shape[2:4] if len(spec.shape) == 4 else ()
    if len(dims) == 2 and all(d for d in dims):
        return int(dims[0] or 0), int(dims[1] or 0)
    given = parse_imgsz(meta["imgsz"]) if "imgsz" in meta else None
    if given is not None:
        return given
    notes.append(
        f"{path.name}: its input size is dynamic and no imgsz metadata says one; "
        f"probing at {_DEFAULT_SIZE}x{_DEFAULT_SIZE}"
    )
    return _DEFAULT_SIZE, _DEFAULT_SIZE


def probe_images(n: int, size: tuple[int, int]) -> torch.Tensor:
    """``n`` deterministic random images ``[n, 3, H, W]`` in [0, 1]."""
    import torch

    generator = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, *size, generator=generator)


def _session(model: onnx.ModelProto, path: Path, device: str, notes: list[str]) -> tuple[Any, str, str]:
    import onnxruntime as ort

    providers = _providers(device, path)
    ort.set_default_logger_severity(4)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent.resolve()))
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    except ort_errors() as exc:
        raise TeacherError(f"{path}: onnxruntime cannot load the model: {' '.join(str(exc).split())[:300]}") from exc
    running = session.get_providers()[0]
    wanted = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
    if running == _CUDA:
        return session, running, f"cuda:{providers[0][1]['device_id']}"
    if wanted == _CUDA and device != "auto":
        raise TeacherError(
            f"{path}: --device {device} asked for CUDA but onnxruntime could not start CUDAExecutionProvider; "
            "fix the CUDA install or use --device cpu"
        )
    if wanted == _CUDA:
        notes.append("onnxruntime could not start CUDAExecutionProvider; running the teacher on CPU")
    return session, running, "cpu"
