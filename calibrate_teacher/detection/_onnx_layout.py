"""Where an ONNX detector's boxes, objectness and class logits are: the layouts :mod:`._onnx` reads.

:func:`read_graph` analyses the graph (named outputs, or the one detections output) and adds the
outputs the logits are read from (:mod:`._onnx_bypass`, or a Softmax's input);
:func:`settle_layout` then fixes ``ultralytics`` vs ``yolox`` from a probe batch: where the
bypass copy differs from the original output are exactly the sigmoid-derived elements.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from calibrate_teacher.detection._onnx_bypass import Bypass, bypass_sigmoids, name_nodes
from calibrate_teacher.detection.base import HeadKind
from calibrate_teacher.errors import InvalidValueError, TeacherError
from calibrate_teacher.teachers._onnx_graph import FLOAT_TYPES, find_pre_softmax, value_shape

if TYPE_CHECKING:
    import onnx
    import torch

OnnxLayout = Literal["ultralytics", "yolox", "named"]


@dataclass(frozen=True)
class GraphReading:
    """Where an ONNX detector's boxes and class logits are read.

    Attributes:
        layout: See the module docstring.
        output: The detections output (``named``: the scores output).
        logits_output: The output holding logits in ``output``'s layout (the bypass copy), or
            the pre-softmax tensor (``named`` softmax).
        boxes_output: ``named`` only: the boxes output.
        logits_tensors: The pre-activation tensors (each skipped Sigmoid's input, or the
            Softmax's input): where a bake divides by T.
        sigmoids: The skipped Sigmoid nodes, in graph order (empty for a softmax head).
        head: The head kind.
        objectness: ``yolox``: column 4 is an objectness logit.
    """

    layout: OnnxLayout
    output: str
    logits_output: str
    boxes_output: str | None
    logits_tensors: tuple[str, ...]
    sigmoids: tuple[str, ...]
    head: HeadKind
    objectness: bool


def _float_outputs(model: onnx.ModelProto) -> str:
    return ", ".join(
        f"{o.name} {FLOAT_TYPES.get(o.type.tensor_type.elem_type, 'non-float')}{list(value_shape(o) or ['?'])}"
        for o in model.graph.output
    )


def read_graph(
    model: onnx.ModelProto,
    *,
    file: Path,
    boxes_output: str | None,
    scores_output: str | None,
    head: HeadKind | None,
) -> tuple[GraphReading, onnx.ModelProto]:
    """Analyse the graph and add the outputs the logits are read from (edits ``model``)."""
    from onnx import helper

    name_nodes(model)
    outputs = {o.name: o for o in model.graph.output}
    listing = _float_outputs(model)
    if (boxes_output is None) != (scores_output is None):
        raise InvalidValueError(f"{file}: give both boxes_output and scores_output (outputs: {listing})")
    if boxes_output is not None and scores_output is not None:
        for name in (boxes_output, scores_output):
            if name not in outputs:
                raise TeacherError(f"{file}: {name!r} is not an output of the model ({listing})")
        tensor, pattern = find_pre_softmax(model, scores_output, rank=3)
        if pattern is not None:
            _check_head(head, "softmax", file, scores_output)
            if tensor not in outputs:
                elem = outputs[scores_output].type.tensor_type.elem_type
                model.graph.output.append(helper.make_tensor_value_info(tensor, elem, None))
            reading = GraphReading("named", scores_output, tensor, boxes_output, (tensor,), (), "softmax", False)
            return reading, model
        bypass = bypass_sigmoids(model, scores_output)
        if bypass is None:
            raise TeacherError(
                f"{file}: the scores output {scores_output!r} comes from no visible Sigmoid or Softmax, "
                "so its logits cannot be recovered; export the model with its final Sigmoid/Softmax "
                "in the graph"
            )
        _check_head(head, "sigmoid", file, scores_output)
        return _reading("named", bypass, boxes_output, objectness=False), model
    floats = [o for o in model.graph.output if o.type.tensor_type.elem_type in FLOAT_TYPES]
    candidates = [o for o in floats if (s := value_shape(o)) is None or len(s) == 3]
    if len(candidates) != 1:
        raise TeacherError(
            f"{file}: expected one detections output [B, 4+C, N] (ultralytics) or [B, N, 5+C] "
            f"(YOLOX) ({listing}); name the outputs with --boxes-output and --scores-output"
        )
    output = candidates[0].name
    bypass = bypass_sigmoids(model, output)
    if bypass is None:
        raise TeacherError(
            f"{file}: the class scores of {output!r} come from no visible Sigmoid, so their logits "
            "cannot be recovered; export the model with its final Sigmoid in the graph"
        )
    _check_head(head, "sigmoid", file, output)
    return _reading("ultralytics", bypass, None, objectness=False), model  # layout fixed by the probe


def _reading(layout: OnnxLayout, bypass: Bypass, boxes: str | None, *, objectness: bool) -> GraphReading:
    return GraphReading(
        layout,
        bypass.output,
        bypass.logits_output,
        boxes,
        bypass.logits_tensors,
        bypass.sigmoids,
        "sigmoid",
        objectness,
    )


def _check_head(given: HeadKind | None, found: HeadKind, file: Path, output: str) -> None:
    if given is not None and given != found:
        raise InvalidValueError(
            f"{file}: head={given!r} but {output!r} ends in a {'Softmax' if found == 'softmax' else 'Sigmoid'} "
            f"(a {found} head); drop head= or pass head={found!r}"
        )


def settle_layout(
    reading: GraphReading, original: torch.Tensor, copy: torch.Tensor, *, names: tuple[str, ...] | None, file: Path
) -> GraphReading:
    """Fix the layout from where the copy differs from the original on a probe batch.

    Raises:
        TeacherError: the sigmoid-derived elements are not whole rows 4: (ultralytics), whole
            columns 4: (YOLOX) or the whole scores output (named).
    """
    differs = original != copy
    if reading.layout == "named":
        if not bool(differs.all()):
            raise TeacherError(f"{file}: only part of {reading.output!r} comes from a Sigmoid; cannot read its logits")
        _check_sigmoid(original, copy, file)
        return reading
    layout: OnnxLayout | None = None
    if original.ndim == 3 and original.shape[1] > 4 and not differs[:, :4].any() and differs[:, 4:].all():
        layout = "ultralytics"
    elif original.ndim == 3 and original.shape[2] > 4 and not differs[..., :4].any() and differs[..., 4:].all():
        layout = "yolox"
    if layout is None:
        raise TeacherError(
            f"{file}: {reading.output!r} {tuple(original.shape)} is neither [B, 4+C, N] with Sigmoid class "
            "rows (ultralytics) nor [B, N, 5+C] with Sigmoid objectness and classes (YOLOX); name the "
            "outputs with --boxes-output and --scores-output"
        )
    width = original.shape[1] if layout == "ultralytics" else original.shape[2]
    objectness = layout == "yolox" and not (names is not None and width == 4 + len(names))
    if layout == "yolox":
        _check_sigmoid(original[..., 4:], copy[..., 4:], file)
    else:
        _check_sigmoid(original[:, 4:], copy[:, 4:], file)
    return GraphReading(
        layout,
        reading.output,
        reading.logits_output,
        None,
        reading.logits_tensors,
        reading.sigmoids,
        "sigmoid",
        objectness,
    )


def _check_sigmoid(original: torch.Tensor, copy: torch.Tensor, file: Path) -> None:
    import torch

    if not torch.allclose(torch.sigmoid(copy.double()), original.double(), atol=1e-5, rtol=0):
        raise TeacherError(f"{file}: the skipped Sigmoids do not give the scores; the graph is not understood")
