"""torch.export teachers (``.pt2`` archives written by ``torch.export.save``).

The program records its input shapes, so the probe batch comes from the file itself. A program
whose selected output is ``aten.softmax`` over the last dimension is read at the softmax's input.

Baking edits the FX graph of ``program.module()``: one ``aten.div`` by T is inserted right after the
logits node (before the softmax, when there is one), every other use is rewired to it, and the
result is exported again with the batch dimension dynamic (where the program allows it).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from calibrate_teacher._device import resolve_device
from calibrate_teacher.errors import BakeError, TeacherError
from calibrate_teacher.teachers._files import BakedFiles
from calibrate_teacher.teachers._torch import ModuleTeacher, expand_sample, select_output
from calibrate_teacher.teachers.base import InputSpec

if TYPE_CHECKING:
    import torch
    from torch.export import ExportedProgram
    from torch.fx import GraphModule, Node


class ExportTeacher(ModuleTeacher):
    """A teacher over ``ExportedProgram.module()``."""

    program: ExportedProgram
    logits_node: str


def read_program(path: Path) -> ExportedProgram:
    """``torch.export.load`` with a one-line error for a damaged archive."""
    import torch

    try:
        return torch.export.load(str(path))
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        raise TeacherError(f"{path}: cannot load the torch.export program ({exc})") from exc


def load(
    path: Path,
    *,
    device: str,
    output: str | None,
    arch: str | None,
    arch_kwargs: Mapping[str, object] | str | None,
) -> ExportTeacher:
    """Load a ``.pt2`` program; find its logits node (the softmax input, if it ends in one)."""
    program = read_program(path)
    where = resolve_device(device)
    spec, example = _input(program, path)
    sample = expand_sample(example, 2 if spec.shape[0] is None else int(spec.shape[0]))
    module = program.module()
    node = _logits_node(module, sample, output, path)
    pre = _pre_softmax(node)
    module = module.to(where)
    logits_fn = None
    if pre is not None:
        logits_module = program.module().to(where)
        _return_node(logits_module, pre.name)

        def logits_fn(x: torch.Tensor) -> object:
            return logits_module(x)

    notes = [f"--arch ignored: {path.name} is a torch.export program"] if arch else []
    teacher = ExportTeacher(
        path,
        "export",
        module,
        device=where,
        output=output,
        input_dtype=example.dtype,
        logits_fn=logits_fn,
        sample=sample,
        input_spec=spec,
        notes=notes,
    )
    teacher.program, teacher.logits_node = program, (pre or node).name
    return teacher


def _input(program: ExportedProgram, path: Path) -> tuple[InputSpec, torch.Tensor]:
    import torch

    user = list(program.graph_signature.user_inputs)
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    values = [nodes[name].meta.get("val") for name in user if name in nodes]
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if len(user) != 1 or len(tensors) != 1:
        raise TeacherError(
            f"{path}: the program takes {len(user)} inputs ({', '.join(user)}); "
            "teachers with exactly one tensor input are supported"
        )
    fake = tensors[0]
    shape = tuple(int(d) if isinstance(d, int) else None for d in fake.shape)
    example = torch.zeros([d if d is not None else 2 for d in shape], dtype=fake.dtype)
    args = program.example_inputs[0] if program.example_inputs else ()
    if args and isinstance(args[0], torch.Tensor):
        example = args[0].detach().cpu()
    dtype = str(fake.dtype).removeprefix("torch.")
    return InputSpec(name=user[0], shape=shape, dtype=dtype), example


def _output_nodes(module: GraphModule) -> list[Node]:
    out = next(n for n in module.graph.nodes if n.op == "output")
    return list(out.args[0])


def _logits_node(module: GraphModule, sample: torch.Tensor, output: str | None, path: Path) -> Node:
    """The graph node that produces the selected output (matched by object identity)."""
    import torch
    from torch.utils._pytree import tree_leaves

    with torch.inference_mode():
        out = module(sample)
    target = select_output(out, output, file=path)
    index = next(i for i, leaf in enumerate(tree_leaves(out)) if leaf is target)
    return _output_nodes(module)[index]


def _pre_softmax(node: Node) -> Node | None:
    """The input of ``node`` when it is a softmax over the last dimension, else None."""
    import torch

    targets = (torch.ops.aten.softmax.int, torch.ops.aten._softmax.default)
    if node.op != "call_function" or node.target not in targets:
        return None
    value = node.meta.get("val")
    rank = value.ndim if isinstance(value, torch.Tensor) else 2
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", -1)
    source = node.args[0]
    if isinstance(dim, int) and dim in (-1, rank - 1) and isinstance(source, type(node)):
        return source
    return None


def _return_node(module: GraphModule, name: str) -> None:
    """Make ``module`` return the node called ``name`` in place of its softmax output."""
    graph = module.graph
    node = next(n for n in graph.nodes if n.name == name)
    for user in list(node.users):
        if user.op == "call_function" and _pre_softmax(user) is node:
            user.replace_all_uses_with(node)
    graph.eliminate_dead_code()
    module.recompile()


def bake(
    teacher: ExportTeacher, temperature: float, staged: Path, *, head: str | None
) -> BakedFiles:
    """Insert ``div`` by T after the logits node, re-export, save to ``staged``."""
    import torch
    from torch.export import Dim

    module = teacher.program.module()
    graph = module.graph
    node = next(n for n in graph.nodes if n.name == teacher.logits_node)
    with graph.inserting_after(node):
        scaled = graph.call_function(torch.ops.aten.div.Tensor, (node, temperature))
    node.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
    module.recompile()
    spec = teacher.input_spec
    if spec is None:  # pragma: no cover - load() always sets it for programs
        raise BakeError(f"{teacher.path}: the program's input shape is unknown")
    # The batch dimension and every dimension that was dynamic stay dynamic (AUTO: where the
    # program allows); the rest keep their exported sizes.
    dims = {i: Dim.AUTO if i == 0 or d is None else Dim.STATIC for i, d in enumerate(spec.shape)}
    sample = teacher._probe(2).cpu()
    try:
        program = torch.export.export(module, (sample,), dynamic_shapes=(dims,))
        torch.export.save(program, str(staged))
    except (RuntimeError, ValueError, TypeError) as exc:
        raise BakeError(
            f"{teacher.path}: re-exporting with the temperature failed: "
            f"{' '.join(str(exc).split())[:200]}"
        ) from exc
    return BakedFiles(staged)
