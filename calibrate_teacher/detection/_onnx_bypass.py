"""Reading pre-activation class logits out of an ONNX detector, in the layout of its output.

A detector's score output is built from its class logits by an activation (``Sigmoid``, one
per feature level or one for all) and then only *rearranged*: concatenated with the decoded
boxes, reshaped, transposed, sliced. :func:`bypass_sigmoids` walks back from the output through
such layout operators (:data:`LAYOUT_OPS`), collects the ``Sigmoid`` nodes it reaches, and adds a
copy of that layout path in which every such ``Sigmoid`` is skipped. The copy is a new graph
output with the same shape as the original: element for element it holds the same values,
except that where the original holds ``sigmoid(z)`` the copy holds ``z``. The model's own nodes
and outputs are untouched (boxes are computed once, by the same nodes), so box positions of the
copy are bit-identical to the original's.

Which elements are logits is then read from the two outputs on a probe batch (the copy differs
from the original exactly at sigmoid-derived elements), never from the range of the values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

#: Operators that only move, copy or select elements (their data inputs are followed back).
LAYOUT_OPS = frozenset(
    {
        "Identity",
        "Concat",
        "Reshape",
        "Transpose",
        "Slice",
        "Split",
        "Squeeze",
        "Unsqueeze",
        "Flatten",
        "Gather",
        "Cast",
    }
)
SUFFIX = "__calibrate_teacher_logits"


@dataclass(frozen=True)
class Bypass:
    """The copy of an output's layout path with its Sigmoids skipped.

    Attributes:
        output: The original graph output.
        logits_output: The added graph output (the copy).
        sigmoids: Names of the ``Sigmoid`` nodes skipped, in graph order.
        logits_tensors: The tensor each of them reads (its pre-sigmoid logits), same order.
    """

    output: str
    logits_output: str
    sigmoids: tuple[str, ...]
    logits_tensors: tuple[str, ...]


def _data_inputs(node: onnx.NodeProto) -> list[str]:
    return [i for i in node.input if i] if node.op_type == "Concat" else [node.input[0]]


def layout_sigmoids(model: onnx.ModelProto, output: str) -> tuple[list[onnx.NodeProto], set[int]]:
    """The Sigmoid nodes behind ``output`` through layout ops, and the layout nodes' indices."""
    producers = {out: (i, node) for i, node in enumerate(model.graph.node) for out in node.output}
    sigmoids: dict[int, onnx.NodeProto] = {}
    path: set[int] = set()
    stack, seen = [output], set()
    while stack:
        tensor = stack.pop()
        if tensor in seen or tensor not in producers:
            continue
        seen.add(tensor)
        index, node = producers[tensor]
        if node.op_type == "Sigmoid":
            sigmoids[index] = node
        elif node.op_type in LAYOUT_OPS:
            path.add(index)
            stack.extend(_data_inputs(node))
    return [sigmoids[i] for i in sorted(sigmoids)], path


def bypass_sigmoids(model: onnx.ModelProto, output: str, *, only: set[str] | None = None) -> Bypass | None:
    """Add the copy of ``output``'s layout path with its Sigmoids skipped (in place).

    Args:
        model: The model, edited in place (nodes and one output appended).
        output: The graph output to copy.
        only: Skip only the Sigmoid nodes with these names (the others stay in the copy).

    Returns:
        The :class:`Bypass`, or None when no Sigmoid lies behind ``output``.
    """
    from onnx import helper

    found, path = layout_sigmoids(model, output)
    found = [s for s in found if only is None or s.name in only]
    if not found:
        return None
    graph = model.graph
    rename = {s.output[0]: s.input[0] for s in found}
    taken = {name for n in graph.node for name in (*n.input, *n.output)} | {o.name for o in graph.output}
    clones = []
    for index, node in enumerate(graph.node):
        if index not in path or not any(i in rename for i in _data_inputs(node)):
            continue
        data = set(_data_inputs(node))
        inputs = [rename.get(i, i) if i in data else i for i in node.input]
        outputs = []
        for out in node.output:
            new = _fresh(out + SUFFIX, taken)
            rename[out] = new
            outputs.append(new)
        clone = helper.make_node(
            node.op_type, inputs, outputs, name=_fresh((node.name or node.op_type) + SUFFIX, taken)
        )
        clone.attribute.extend(node.attribute)
        clones.append(clone)
    if output not in rename:
        return None
    graph.node.extend(clones)
    original = next(o for o in graph.output if o.name == output)
    added = graph.output.add()
    added.CopyFrom(original)
    added.name = rename[output]
    return Bypass(
        output=output,
        logits_output=rename[output],
        sigmoids=tuple(s.name for s in found),
        logits_tensors=tuple(s.input[0] for s in found),
    )


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every unnamed node a unique name (so Sigmoids can be told apart)."""
    taken = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = _fresh(f"{node.op_type}_{i}", taken)


def _fresh(base: str, taken: set[str]) -> str:
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name
