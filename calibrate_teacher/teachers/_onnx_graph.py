"""Reading and editing ONNX graphs: pick the logits, see through a final softmax, insert ``Div``.

Everything works on a ``ModelProto`` loaded with ``load_external_data=False``, so a model with
gigabytes of external weights is analysed and edited without reading them.

Softmax patterns recognised at the selected output (through ``Identity`` nodes):

* ``Softmax(z)`` over the last axis;
* ``Div(Exp(z), ReduceSum(Exp(z), axes=[-1]))``, optionally with ``z = Sub(x, ReduceMax(x))``
  (then ``x`` is the logits tensor).

The temperature goes in as ``z = Div(z_raw, T)`` right after the node that produces the logits
tensor ``z``: the producer's output is renamed and ``z`` keeps its name, so every consumer (the
softmax, a second ``logits`` output, ...) sees ``z / T`` and no graph output changes name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from calibrate_teacher.errors import BakeError, TeacherError

if TYPE_CHECKING:
    from collections.abc import Iterator

    import onnx

#: ONNX TensorProto element types that hold floating-point values.
FLOAT_TYPES = {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16"}
_ALIGN = 4096  # external data blocks start on page boundaries, as onnx's own writer allows


@dataclass(frozen=True)
class LogitsTensor:
    """Where the logits live in a graph.

    Attributes:
        output: The graph output the user reads (``--output``).
        tensor: The tensor holding the pre-softmax logits (``output`` itself when no softmax).
        softmax: The softmax pattern found between them, or None.
        elem_type: ONNX element type of the output (and of the logits).
        shape: The output's shape; None for dynamic or unknown dimensions.
    """

    output: str
    tensor: str
    softmax: str | None
    elem_type: int
    shape: tuple[int | None, ...] | None


def value_shape(value: onnx.ValueInfoProto) -> tuple[int | None, ...] | None:
    """The static shape of a value (None for symbolic dims), or None without a shape."""
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)


def real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are not initializers (IR < 4 lists weights as inputs too)."""
    weights = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in weights]


def opset(model: onnx.ModelProto) -> int:
    """The default-domain opset version."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def choose_output(model: onnx.ModelProto, name: str | None, *, file: Path) -> LogitsTensor:
    """Pick the logits output and analyse it.

    The output is ``name`` when given, else the first float output of rank 2 (or unknown rank)
    whose name contains ``logit``, else the first float output of rank 2.
    """
    outputs = list(model.graph.output)
    listing = ", ".join(
        f"{o.name} {FLOAT_TYPES.get(o.type.tensor_type.elem_type, 'non-float')}"
        f"{list(value_shape(o) or ['?'])}"
        for o in outputs
    )
    if name is not None:
        chosen = next((o for o in outputs if o.name == name), None)
        if chosen is None:
            raise TeacherError(
                f"{file}: --output {name!r} is not an output of the model ({listing})"
            )
        if chosen.type.tensor_type.elem_type not in FLOAT_TYPES:
            raise TeacherError(f"{file}: --output {name!r} is not a float tensor ({listing})")
    else:
        floats = [o for o in outputs if o.type.tensor_type.elem_type in FLOAT_TYPES]
        ranked = [o for o in floats if (s := value_shape(o)) is None or len(s) == 2]
        if not ranked:
            raise TeacherError(
                f"{file}: no float output of shape [N, C] ({listing}); "
                "pick the logits with --output NAME"
            )
        # An output called "logits" wins over, say, an earlier "features" output.
        chosen = next((o for o in ranked if "logit" in o.name.lower()), ranked[0])
    shape = value_shape(chosen)
    tensor, pattern = find_pre_softmax(model, chosen.name, rank=len(shape) if shape else 2)
    return LogitsTensor(chosen.name, tensor, pattern, chosen.type.tensor_type.elem_type, shape)


def find_pre_softmax(model: onnx.ModelProto, name: str, *, rank: int) -> tuple[str, str | None]:
    """Return (logits tensor, pattern) for output ``name``; (name, None) when no softmax ends it."""
    producers = {out: node for node in model.graph.node for out in node.output}
    constants = _constants(model)
    version = opset(model)
    last = (-1, rank - 1)
    tensor = name
    while (node := producers.get(tensor)) is not None and node.op_type == "Identity":
        tensor = node.input[0]
    if node is None:
        return name, None
    if node.op_type == "Softmax":
        axis = _attr(node, "axis", 1 if version < 13 else -1)
        if axis in last:
            return node.input[0], "Softmax"
        return name, None
    if node.op_type != "Div" or len(node.input) != 2:
        return name, None
    exp, total = producers.get(node.input[0]), producers.get(node.input[1])
    if exp is None or total is None or exp.op_type != "Exp" or total.op_type != "ReduceSum":
        return name, None
    if total.input[0] != exp.output[0] or _attr(total, "keepdims", 1) != 1:
        return name, None
    axes = _attr(total, "axes", None)  # an attribute before opset 13, an input since
    if axes is None and len(total.input) > 1:
        axes = constants.get(total.input[1])
    if not isinstance(axes, list) or len(axes) != 1 or axes[0] not in last:
        return name, None
    logits = exp.input[0]
    # exp(x - max(x)) is the stable spelling; x itself is then the logits.
    sub = producers.get(logits)
    if sub is not None and sub.op_type == "Sub":
        peak = producers.get(sub.input[1])
        if peak is not None and peak.op_type == "ReduceMax" and peak.input[0] == sub.input[0]:
            logits = sub.input[0]
    return logits, "Exp/ReduceSum/Div"


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _constants(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Small integer constants (initializers and Constant nodes), for ReduceSum's axes input."""
    import onnx
    from onnx import numpy_helper

    found: dict[str, list[int]] = {}
    for tensor in model.graph.initializer:
        if tensor.data_type == 7 and len(tensor.dims) <= 1 and not tensor.external_data:
            found[tensor.name] = [int(v) for v in numpy_helper.to_array(tensor).reshape(-1)]
    for node in model.graph.node:
        if node.op_type == "Constant":
            value = _attr(node, "value", None)
            if isinstance(value, onnx.TensorProto) and value.data_type == 7:
                found[node.output[0]] = [int(v) for v in numpy_helper.to_array(value).reshape(-1)]
    return found


def insert_division(
    model: onnx.ModelProto, tensor: str, temperature: float, elem_type: int
) -> None:
    """Make ``tensor`` equal its old value divided by ``temperature`` (in its own dtype)."""
    from onnx import helper

    graph = model.graph
    index = next((i for i, n in enumerate(graph.node) if tensor in n.output), None)
    if index is None:
        raise BakeError(f"the logits tensor {tensor!r} is not computed by a node of the main graph")
    taken = {name for n in graph.node for name in (*n.input, *n.output)}
    raw = _fresh(f"{tensor}_uncalibrated", taken)
    divisor = _fresh(f"{tensor}_temperature", taken)
    producer = graph.node[index]
    producer.output[list(producer.output).index(tensor)] = raw
    constant = helper.make_node(
        "Constant",
        [],
        [divisor],
        name=divisor,
        value=helper.make_tensor(divisor, elem_type, [], [temperature]),
    )
    divide = helper.make_node("Div", [raw, divisor], [tensor], name=f"{divisor}_div")
    if opset(model) < 7:  # before opset 7, Div broadcasts a scalar only when told to
        divide.attribute.append(helper.make_attribute("broadcast", 1))
    graph.node.insert(index + 1, constant)
    graph.node.insert(index + 2, divide)


def _fresh(base: str, taken: set[str]) -> str:
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _all_tensors(attribute.g)
            for sub in attribute.graphs:
                yield from _all_tensors(sub)


@dataclass(frozen=True)
class ExternalTensor:
    """One tensor whose bytes live in an external data file.

    Attributes:
        tensor: The tensor proto (its ``external_data`` entries are rewritten by the merge).
        file: The data file, resolved (symlinks followed) and inside the model's folder.
        offset: Where the tensor's bytes start in ``file``.
        length: How many bytes it has.
    """

    tensor: onnx.TensorProto
    file: Path
    offset: int
    length: int


def external_tensors(model: onnx.ModelProto, base: Path) -> list[ExternalTensor]:
    """Every tensor stored outside the model, checked before anything reads its bytes.

    A location must name a regular file that, with every symlink followed, lies inside the
    model's folder ``base``; offset and length must fit inside that file. So neither
    onnxruntime nor the bake ever reads a file the model does not own.

    Raises:
        TeacherError: naming the tensor, its location and what is wrong.
    """
    import stat

    root = base.resolve()
    found: list[ExternalTensor] = []
    for tensor in _all_tensors(model.graph):
        if tensor.data_location != 1:  # TensorProto.EXTERNAL
            continue
        entries = {e.key: e.value for e in tensor.external_data}
        location = entries.get("location", "")
        where = f"{base}: tensor {tensor.name!r} keeps its data in {location!r}"
        if not location or os.path.isabs(location) or ".." in Path(location).parts:
            raise TeacherError(f"{where}, outside the model's folder; refusing to read it")
        try:
            real = (base / location).resolve(strict=True)
            info = os.stat(real)
        except FileNotFoundError as exc:
            raise TeacherError(f"{base / location}: the external data file the model needs is missing") from exc
        except (OSError, RuntimeError) as exc:  # a symlink loop, a permission error
            raise TeacherError(f"{where}, which cannot be opened ({exc})") from exc
        if not real.is_relative_to(root):
            raise TeacherError(
                f"{where}, a link to {real} outside the model's folder; refusing to read it"
            )
        if not stat.S_ISREG(info.st_mode):
            raise TeacherError(f"{where}, which is not a regular file")
        try:
            offset = int(entries.get("offset", 0))
            length = int(entries.get("length", info.st_size - offset))
        except ValueError as exc:
            raise TeacherError(f"{where} with a malformed offset or length ({exc})") from exc
        if offset < 0 or length < 0 or offset + length > info.st_size:
            raise TeacherError(
                f"{where} at bytes [{offset}, {offset + length}), past the file's "
                f"{info.st_size} bytes; the model or its data file is damaged"
            )
        found.append(ExternalTensor(tensor, real, offset, length))
    return found


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Remove initializers no node (of any subgraph) and no graph output reads."""
    used = set(_names_read(model.graph)) | {o.name for o in model.graph.output}
    dropped = {t.name for t in model.graph.initializer if t.name not in used}
    if not dropped:
        return
    keep = [t for t in model.graph.initializer if t.name not in dropped]
    inputs = [v for v in model.graph.input if v.name not in dropped]  # IR < 4 lists them too
    del model.graph.initializer[:], model.graph.input[:]
    model.graph.initializer.extend(keep)
    model.graph.input.extend(inputs)


def _names_read(graph: onnx.GraphProto) -> Iterator[str]:
    for node in graph.node:
        yield from node.input
        for attribute in node.attribute:
            subgraphs = [attribute.g] if attribute.HasField("g") else []
            for sub in (*subgraphs, *attribute.graphs):
                yield from _names_read(sub)
                yield from (o.name for o in sub.output)


def merge_external_data(model: onnx.ModelProto, base: Path, target: Path) -> None:
    """Copy each external tensor's bytes into one ``target`` and point the tensors at it.

    Only the bytes of tensors the model holds are copied (each at a page-aligned offset),
    never whole files, so bytes the graph does not own never reach the output.
    """
    tensors = external_tensors(model, base)
    with open(target, "wb") as out:
        for item in tensors:
            out.write(b"\0" * (-out.tell() % _ALIGN))
            start = out.tell()
            with open(item.file, "rb") as src:
                src.seek(item.offset)
                left = item.length
                while left:
                    block = src.read(min(left, 16 << 20))
                    if not block:
                        raise TeacherError(f"{item.file}: shorter than the model says; it is damaged")
                    out.write(block)
                    left -= len(block)
            entries = {e.key: e.value for e in item.tensor.external_data}
            entries.update(location=target.name, offset=str(start), length=str(item.length))
            del item.tensor.external_data[:]
            for key, value in entries.items():
                entry = item.tensor.external_data.add()
                entry.key, entry.value = key, value
