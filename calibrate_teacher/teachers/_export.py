"""torch.export teachers (``.pt2`` archives written by ``torch.export.save``).

The program records its input shapes, so the probe batch comes from the file itself. A program
whose selected output is ``aten.softmax`` over the last dimension is read at the softmax's input.

A program exported the default way (``torch.export.export(m, (x,))``, no ``dynamic_shapes``) runs
on one batch size only; so does one whose batch dimension has bounds. ``batch_rows`` records what
the program takes, and :meth:`ExportTeacher.logits` runs any batch in chunks it accepts (see
:func:`~calibrate_teacher.teachers._batching.run_in_chunks`); the probe batch is made at a size the
program takes. An input whose *other* dimensions differ from the program's fixed sizes is refused
with one line that names the ``dynamic_shapes=`` to re-export with, never the guard's traceback.

Baking edits the FX graph of ``program.module()``: one ``aten.div`` by T is inserted right after the
logits node (before the softmax, when there is one), every other use is rewired to it, and the
result is exported again with the batch dimension as dynamic as the original's (``Dim.AUTO``, with
its bounds) or, for a static program, the same fixed batch (a static program's graph may bake its
batch size into reshapes, so re-exporting it dynamic is not possible in general).

A program in a file with another suffix (``model.bin``: found by content) is read and written
through a file object, which torch.export accepts silently whatever the name.

A program with several tensor inputs (``input_ids``, ``attention_mask``...) is fed by name: the
names are the program's user inputs (``graph_signature.user_inputs``, the exported ``forward``'s
parameter names), each called the way it was exported (by position or by keyword, from
``call_spec.in_spec``), each cast to the dtype recorded for it; ``input_specs`` lists them all.
The bake re-exports with every input, by the same positions and keywords.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from calibrate_teacher._device import resolve_device
from calibrate_teacher.errors import BakeError, TeacherError
from calibrate_teacher.teachers._batching import BatchRows, batch_note
from calibrate_teacher.teachers._files import BakedFiles
from calibrate_teacher.teachers._inputs import InputPlan
from calibrate_teacher.teachers._pt2_safety import audit_archive, check_graph, forced_weights_only
from calibrate_teacher.teachers._torch import (
    ModuleFn,
    ModuleTeacher,
    expand_inputs,
    select_output,
)
from calibrate_teacher.teachers.base import Inputs, InputSpec

if TYPE_CHECKING:
    import torch
    from torch.export import ExportedProgram
    from torch.fx import GraphModule, Node


class ExportTeacher(ModuleTeacher):
    """A teacher over ``ExportedProgram.module()``."""

    program: ExportedProgram
    logits_node: str
    signature: ProgramInputs

    def _reshape_hint(self, dims: Sequence[int]) -> str:
        return f"re-export it with {dynamic_hint(self.input_spec, dims)}"


def dynamic_hint(spec: InputSpec | None, dims: Sequence[int] = ()) -> str:
    """``dynamic_shapes={"x": {0: Dim.AUTO, ...}}`` for the batch and ``dims``."""
    name = spec.name if spec is not None and spec.name else "x"
    axes = ", ".join(f"{d}: Dim.AUTO" for d in sorted({0, *dims}))
    return f'dynamic_shapes={{"{name}": {{{axes}}}}}'


def read_program(path: Path) -> ExportedProgram:
    """``torch.export.load`` of an audited archive, with a one-line error for a damaged one.

    The archive is checked first (:func:`~calibrate_teacher.teachers._pt2_safety.audit_archive`:
    nothing that torch would unpickle, ``eval`` or run natively), every ``torch.load`` inside is
    forced to ``weights_only=True``, and the loaded graph's targets are checked again.
    """
    import torch

    audit_archive(path)
    try:
        with forced_weights_only(), _quiet_export_log():
            if path.suffix.lower() == ".pt2":
                program = torch.export.load(str(path))
            else:  # torch.export warns about a name without .pt2, never about a file object
                with open(path, "rb") as fh:
                    program = torch.export.load(fh)
    except (RuntimeError, ValueError, KeyError, OSError, AssertionError, TypeError) as exc:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise TeacherError(f"{path}: cannot load the torch.export program ({reason})") from exc
    check_graph(path, program.graph_module)
    return program


@contextlib.contextmanager
def _quiet_export_log() -> Iterator[None]:
    """torch.export.load logs a traceback before its own fallback; the error is ours to report."""
    import logging

    logger = logging.getLogger("torch.export")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


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
    signature = _inputs(program, path)
    spec, rows = signature.specs[0], signature.rows
    sample = expand_inputs(signature.example, sample_rows(rows))
    module = program.module()
    node = _logits_node(module, signature.caller(module), sample, output, path)
    pre = _pre_softmax(node)
    module = module.to(where)
    logits_fn = None
    if pre is not None:
        logits_module = program.module().to(where)
        _return_node(logits_module, pre.name)
        logits_fn = _guarded(signature.caller(logits_module), path, spec)

    notes = [f"--arch ignored: {path.name} is a torch.export program"] if arch else []
    notes += batch_note(path, rows, f"re-export it with {dynamic_hint(spec)}")
    first = signature.example
    teacher = ExportTeacher(
        path,
        "export",
        _guarded(signature.caller(module), path, spec),
        device=where,
        output=output,
        input_dtype=(next(iter(first.values())) if isinstance(first, Mapping) else first).dtype,
        logits_fn=logits_fn,
        sample=sample,
        input_spec=spec,
        notes=notes,
        batch_rows=rows,
        plan=signature.plan,
        input_specs=signature.specs,
    )
    teacher.program, teacher.logits_node = program, (pre or node).name
    teacher.signature = signature
    return teacher


def sample_rows(rows: BatchRows | None) -> int:
    """The rows of a batch the program takes: 2, moved into its bounds."""
    if rows is None:
        return 2
    fewest, most = rows
    return max(fewest, 2) if most is None else min(max(fewest, 2), most)


def _guarded(module: ModuleFn, path: Path, spec: InputSpec) -> ModuleFn:
    """``module`` with the program's input-guard failures turned into one-line TeacherErrors."""

    def run(x: Inputs) -> object:
        try:
            return module(x)
        except (AssertionError, RuntimeError) as exc:
            text = " ".join(str(exc).split())
            if "Guard failed" not in text and "Expected input" not in text:
                raise
            # The guard names the dimensions it checks: x.size()[2] >= 4
            dims = sorted({int(d) for d in re.findall(r"(?:size\(\)|shape)\[(\d+)\]", text)})
            first = next(iter(x.values())) if isinstance(x, Mapping) else x
            shape = (
                ", ".join(f"{k} {tuple(v.shape)}" for k, v in x.items())
                if isinstance(x, Mapping)
                else str(tuple(x.shape))
            )
            raise TeacherError(
                f"{path}: the program does not run on inputs of shape {shape} "
                f"({text[:160]}); re-export it with {dynamic_hint(spec, dims or range(1, first.ndim))}"
            ) from exc

    return run


@dataclass(frozen=True)
class ProgramInputs:
    """How a program is called: its tensor inputs by name, by position and by keyword.

    Attributes:
        specs: Each user input's name, shape and dtype, in the program's order.
        positional: The names passed by position, in order.
        keywords: ``(keyword, name)`` for those passed by keyword.
        example: An example input (one tensor), or named example inputs (several).
        rows: The batch sizes the program takes (from the first input's batch dimension).
        plan: For several inputs, what :mod:`~calibrate_teacher.teachers._inputs` feeds; None
            for one.
    """

    specs: tuple[InputSpec, ...]
    positional: tuple[str, ...]
    keywords: tuple[tuple[str, str], ...]
    example: Inputs
    rows: BatchRows | None
    plan: InputPlan | None

    def caller(self, module: Callable[..., object]) -> ModuleFn:
        """``module`` called with one tensor, or with named inputs at their positions/keywords."""
        if self.plan is None:
            return module

        def call(x: Inputs) -> object:
            if not isinstance(x, Mapping):  # pragma: no cover - ModuleTeacher feeds mappings
                raise TeacherError(f"the program takes named inputs ({', '.join(self.positional)})")
            return module(*(x[n] for n in self.positional), **{k: x[n] for k, n in self.keywords})

        return call

    def call_args(self, x: Inputs) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
        """``(args, kwargs)`` for ``torch.export.export`` from one tensor or named inputs."""
        if not isinstance(x, Mapping):
            return (x,), {}
        return tuple(x[n] for n in self.positional), {k: x[n] for k, n in self.keywords}


def _inputs(program: ExportedProgram, path: Path) -> ProgramInputs:
    """The program's tensor inputs: specs, how they are passed, an example, the batch sizes."""
    import torch

    user = list(program.graph_signature.user_inputs)
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    values = [nodes[name].meta.get("val") for name in user if name in nodes]
    if not user or len(values) != len(user) or not all(isinstance(v, torch.Tensor) for v in values):
        raise TeacherError(
            f"{path}: the program takes {len(user)} inputs ({', '.join(user) or 'none'}); "
            "teachers whose inputs are all tensors are supported"
        )
    fakes: list[torch.Tensor] = [v for v in values if isinstance(v, torch.Tensor)]
    specs = tuple(
        InputSpec(
            name=name,
            shape=tuple(int(d) if isinstance(d, int) else None for d in fake.shape),
            dtype=str(fake.dtype).removeprefix("torch."),
        )
        for name, fake in zip(user, fakes, strict=True)
    )
    examples = [
        torch.zeros([d if d is not None else 2 for d in spec.shape], dtype=fake.dtype)
        for spec, fake in zip(specs, fakes, strict=True)
    ]
    args, kwargs = program.example_inputs if program.example_inputs else ((), {})
    recorded = [*args, *kwargs.values()]
    if len(recorded) == len(examples) and all(isinstance(t, torch.Tensor) for t in recorded):
        examples = [t.detach().cpu() for t in recorded]
    positional, keywords = _passing(program, user)
    rows = _batch_rows(program, fakes[0].shape[0]) if fakes[0].ndim else None
    if len(user) == 1:
        return ProgramInputs(specs, positional, keywords, examples[0], rows, None)
    plan = InputPlan.of(user, dtypes={str(s.name): s.dtype for s in specs})
    return ProgramInputs(specs, positional, keywords, dict(zip(user, examples, strict=True)), rows, plan)


def _passing(program: ExportedProgram, user: list[str]) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """Which user inputs the program takes by position, and which by keyword (from ``in_spec``)."""
    spec = program.call_spec.in_spec
    children = list(spec.children()) if spec is not None else []
    if len(children) != 2:
        return tuple(user), ()
    count = children[0].num_children
    keys = [str(k) for k in (children[1].context or [])]
    if count + len(keys) != len(user):
        return tuple(user), ()
    return tuple(user[:count]), tuple(zip(keys, user[count:], strict=True))


def _batch_rows(program: ExportedProgram, size: object) -> BatchRows | None:
    """(fewest, most) rows the program takes: a static size, or its symbol's range."""
    if isinstance(size, int):
        return size, size
    expr = getattr(getattr(size, "node", None), "expr", None)
    bounds = program.range_constraints.get(expr) if expr is not None else None
    if bounds is None:
        return None
    # sympy Integers are finite; torch's int_oo (no upper bound) is not an Integer.
    fewest = max(int(bounds.lower), 1) if bounds.lower.is_Integer else 1
    most = int(bounds.upper) if bounds.upper.is_Integer else None
    return fewest, most


def _output_nodes(module: GraphModule) -> list[Node]:
    out = next(n for n in module.graph.nodes if n.op == "output")
    return list(out.args[0])


def _logits_node(
    module: GraphModule, run: ModuleFn, sample: Inputs, output: str | None, path: Path
) -> Node:
    """The graph node that produces the selected output (matched by object identity)."""
    import torch
    from torch.utils._pytree import tree_leaves

    with torch.inference_mode():
        out = run(sample)
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
    if not teacher.input_specs:  # pragma: no cover - load() always sets them for programs
        raise BakeError(f"{teacher.path}: the program's input shape is unknown")
    # The batch dimension stays as dynamic as it was (AUTO keeps its bounds, since the module's
    # input guards are traced too), every dynamic dimension stays dynamic, the rest keep their
    # exported sizes. A static batch stays static: the graph may hold its size (a reshape).
    rows = teacher.batch_rows
    fixed = rows is not None and rows[0] == rows[1]
    shapes = [
        {
            i: Dim.STATIC if (i == 0 and fixed) or (i > 0 and d is not None) else Dim.AUTO
            for i, d in enumerate(spec.shape)
        }
        for spec in teacher.input_specs
    ]
    probe = teacher._probe(sample_rows(rows))
    sample = {k: v.cpu() for k, v in probe.items()} if isinstance(probe, Mapping) else probe.cpu()
    signature = teacher.signature
    args, kwargs = signature.call_args(sample)
    # dynamic_shapes mirrors (args, kwargs): a tuple for the positions, keywords by name.
    by_name = dict(zip((str(s.name) for s in teacher.input_specs), shapes, strict=True))
    dynamic: tuple[object, ...] | dict[str, object] = tuple(by_name[n] for n in signature.positional)
    if signature.keywords:
        dynamic = {
            **dict(zip(_parameters(module), dynamic, strict=False)),
            **{k: by_name[n] for k, n in signature.keywords},
        }
    try:
        program = torch.export.export(module, args, kwargs or None, dynamic_shapes=dynamic)
        if staged.suffix.lower() == ".pt2":
            torch.export.save(program, str(staged))
        else:  # a teacher found by content keeps its suffix (see read_program)
            with open(staged, "wb") as fh:
                torch.export.save(program, fh)
    except (RuntimeError, ValueError, TypeError, AssertionError) as exc:
        raise BakeError(
            f"{teacher.path}: re-exporting with the temperature failed: "
            f"{' '.join(str(exc).split())[:200]}"
        ) from exc
    return BakedFiles(staged)


def _parameters(module: Callable[..., object]) -> list[str]:
    """The names ``module``'s forward takes by position (for ``dynamic_shapes`` by name)."""
    import inspect

    target = getattr(module, "forward", module)
    params = inspect.signature(target).parameters.values()
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
