r"""What a ``torch.export`` archive (``.pt2``) may hold before we let torch load it.

``torch.export.load`` is not a data reader. Inside it:

* weights and constants whose payload config says ``use_pickle`` are read with
  ``torch.load(weights_only=False)``, custom and opaque objects with ``pickle.loads``;
* the sample inputs are read with ``torch.load(weights_only=True)`` and, when that fails, again
  with ``weights_only=False``;
* every symbolic-shape string (``expr_str``, range constraints) goes through ``sympy.sympify``,
  which ``eval``\\ s it;
* ``guards_code`` strings are compiled into the module's forward by ``program.module()``;
* node targets are resolved as attribute paths below ``torch`` (``torch.os.system`` resolves);
* AOTInductor packages (``data/aotinductor/``) load native shared libraries.

So :func:`audit_archive` reads the archive with :mod:`zipfile` and :mod:`json` (nothing of it is
executed) and refuses anything outside an allowlist: pickled payloads, legacy pickled weight
files, AOTInductor code, node targets other than ``aten``/``prims``/``higher_order`` operators and
the few ``operator``/``math``/``torch.sym_*`` functions export emits, symbolic expressions that
are not plain sympy constructors over numbers and symbol names, and guards that are not
comparisons of input sizes. The sample inputs are checked with ``weights_only=True`` ourselves.
:func:`forced_weights_only` then loads with ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` as a second wall,
and :func:`check_graph` checks the loaded graph's targets again.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import re
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from calibrate_teacher.errors import TeacherError

if TYPE_CHECKING:
    import torch

_FIX = (
    "calibrate-teacher never runs code from a model file; re-export the teacher with "
    "torch.export.save from plain tensors (no tensor subclasses, custom objects or "
    "AOTInductor), or export it to ONNX"
)
_OP = re.compile(r"^torch\.ops\.(aten|prims|higher_order)\.[A-Za-z_]\w*(\.[A-Za-z_]\w*)?$")
#: Operators that read or write files by name.
_FILE_OPS = ("from_file", "save", "load")
_PYTHON_TARGETS = frozenset(
    [f"_operator.{name}" for name in (
        "getitem", "eq", "ne", "le", "ge", "lt", "gt", "neg", "pos", "mul", "add", "sub",
        "floordiv", "mod", "pow", "truediv", "and_", "or_", "lshift", "rshift", "not_",
    )]
    + [f"math.{name}" for name in ("trunc", "ceil", "floor", "sqrt")]
    + [f"torch.{name}" for name in (
        "sym_not", "sym_int", "sym_float", "sym_ite", "sym_max", "sym_min", "sym_sqrt",
        "sym_sum",
    )]
)
#: Constructors a serialised symbolic expression may call (sympy and torch's sympy functions).
_SYMPY_CALLS = frozenset(
    {
        "Symbol", "Dummy", "Integer", "Float", "Rational", "Add", "Mul", "Pow", "Max", "Min",
        "Mod", "Abs", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "Equality",
        "Unequality", "StrictLessThan", "LessThan", "StrictGreaterThan", "GreaterThan",
        "floor", "ceiling", "sqrt", "Piecewise", "ExprCondPair",
        # torch.utils._sympy.functions, as the deserializer lists them
        "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt",
        "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow",
        "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "TruncToFloat",
        "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "OpaqueUnaryFn_sqrt",
        "BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or", "Identity",
    }
)
_SYMPY_STRING_ARGS = frozenset({"Symbol", "Dummy", "Integer", "Float", "Rational"})
_SYMPY_NAMES = frozenset({"oo", "zoo", "nan", "true", "false", "pi", "E", "I", "S"})
_GUARD_METHODS = frozenset({"size", "stride", "storage_offset", "dim", "numel"})
_ARITHMETIC = (
    ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.USub, ast.UAdd,
    ast.Not, ast.And, ast.Or, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE,
    ast.BitAnd, ast.BitOr, ast.LShift, ast.RShift,
)
_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_ENV_LOCK = threading.Lock()


def audit_archive(path: Path) -> None:
    """Refuse a ``.pt2`` archive that holds anything torch would execute or unpickle.

    Raises:
        TeacherError: naming the archive, the entry and the fix.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            _audit(path, archive)
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TeacherError(f"{path}: cannot read the torch.export archive ({exc})") from exc


def _refuse(path: Path, what: str) -> TeacherError:
    return TeacherError(f"{path}: refused: {what}; {_FIX}")


def _audit(path: Path, archive: zipfile.ZipFile) -> None:
    names = archive.namelist()
    format_file = next((n for n in names if n.rsplit("/", 1)[-1] == "archive_format"), None)
    if format_file is None:
        raise _refuse(path, "an archive in the pre-2.7 format (it holds pickles)")
    prefix = format_file[: -len("archive_format")]
    for name in names:
        inner = name.removeprefix(prefix)
        if inner.startswith("data/aotinductor/") or inner.endswith((".so", ".dll", ".dylib")):
            raise _refuse(path, f"{name} is AOTInductor native code")
        if re.fullmatch(r"data/(weights|constants)/[^/]+\.pt", inner):
            raise _refuse(path, f"{name} holds weights in the legacy pickled format")
        if re.fullmatch(r"data/(weights|constants)/[^/]+_config\.json", inner):
            constants = inner.startswith("data/constants/")
            _audit_payloads(path, name, json.loads(archive.read(name)), constants=constants)
        elif re.fullmatch(r"models/[^/]+\.json", inner):
            _audit_program(path, name, json.loads(archive.read(name)))
        elif re.fullmatch(r"data/sample_inputs/[^/]+\.pt", inner):
            _audit_sample_inputs(path, name, archive.read(name))


def _audit_payloads(path: Path, name: str, config: object, *, constants: bool) -> None:
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise _refuse(path, f"{name} is not a payload config")
    for key, meta in entries.items():
        if not isinstance(meta, dict):
            raise _refuse(path, f"{name}: entry {key!r} is malformed")
        if meta.get("use_pickle"):
            raise _refuse(path, f"{name}: {key!r} is stored as a pickle (use_pickle)")
        payload = str(meta.get("path_name", ""))
        if constants and not payload.startswith("tensor_"):
            raise _refuse(path, f"{name}: {key!r} is a custom or opaque object ({payload})")


def _audit_sample_inputs(path: Path, name: str, data: bytes) -> None:
    import pickle

    import torch

    if not data:
        return
    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, TypeError, EOFError) as exc:
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise _refuse(path, f"{name} is not plain tensors ({reason})") from exc


def _audit_program(path: Path, name: str, program: object) -> None:
    if not isinstance(program, dict):
        raise _refuse(path, f"{name} is not a serialised program")
    for guard in program.get("guards_code") or ():
        if not isinstance(guard, str) or not _is_guard(guard):
            raise _refuse(path, f"{name}: guard {str(guard)[:80]!r} is not a shape comparison")
    for key in program.get("range_constraints") or {}:
        if not _is_sympy(str(key)):
            raise _refuse(path, f"{name}: range constraint {str(key)[:80]!r} is not a symbol")
    for target in _walk(program, "target", in_nodes=True):
        if not _allowed_target(target):
            raise _refuse(path, f"{name}: the graph calls {target[:80]!r}")
    for expr in _walk(program, "expr_str", in_nodes=False):
        if not _is_sympy(expr):
            raise _refuse(path, f"{name}: symbolic shape {expr[:80]!r} is not an expression")


def _walk(value: object, key: str, *, in_nodes: bool) -> Iterator[str]:
    """Every string under ``key`` (for targets: only in the ``nodes`` lists of graphs)."""
    stack: list[tuple[object, bool]] = [(value, False)]
    while stack:
        item, is_node = stack.pop()
        if isinstance(item, dict):
            for k, v in item.items():
                if k == key and (is_node or not in_nodes):
                    yield v if isinstance(v, str) else repr(v)
                else:
                    stack.append((v, k == "nodes"))
        elif isinstance(item, list):
            stack.extend((v, is_node) for v in item)


def _allowed_target(target: str) -> bool:
    if target in _PYTHON_TARGETS:
        return True
    match = _OP.match(target)
    if match is None:
        return False
    op = target.split(".")[3]
    return not any(word in op for word in _FILE_OPS)


def _parse(text: str) -> ast.expr | None:
    try:
        return ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, RecursionError):
        return None


def _is_sympy(text: str) -> bool:
    """A sympy ``srepr``/``str`` expression: constructor calls over numbers and symbol names."""
    tree = _parse(text)
    return tree is not None and _sympy_node(tree)


def _sympy_node(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, int | float | bool)
    if isinstance(node, ast.Name):
        return not node.id.startswith("_") and (
            node.id in _SYMPY_NAMES or node.id in _SYMPY_CALLS or re.fullmatch(r"[a-z]+\d+", node.id)
            is not None
        )
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in _SYMPY_CALLS:
            return False
        strings_ok = node.func.id in _SYMPY_STRING_ARGS
        args = [*node.args, *(k.value for k in node.keywords)]
        return all(k.arg is not None for k in node.keywords) and all(
            (strings_ok and isinstance(a, ast.Constant) and isinstance(a.value, str))
            or _sympy_node(a)
            for a in args
        )
    return _operator_node(node, _sympy_node)


def _operator_node(node: ast.expr, check: Callable[[ast.expr], bool]) -> bool:
    """Arithmetic, boolean logic and comparisons whose operands all pass ``check``."""
    if isinstance(node, ast.BinOp):
        return isinstance(node.op, _ARITHMETIC) and check(node.left) and check(node.right)
    if isinstance(node, ast.UnaryOp):
        return isinstance(node.op, _ARITHMETIC) and check(node.operand)
    if isinstance(node, ast.BoolOp):
        return isinstance(node.op, _ARITHMETIC) and all(check(v) for v in node.values)
    if isinstance(node, ast.Compare):
        return all(isinstance(op, _ARITHMETIC) for op in node.ops) and all(
            check(v) for v in (node.left, *node.comparators)
        )
    return False


def _is_guard(text: str) -> bool:
    """``L['x'].size()[0] == 2`` and the like: arithmetic and comparisons of input sizes."""
    tree = _parse(text)
    return tree is not None and _guard_node(tree)


def _guard_node(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, int | float | bool)
    if isinstance(node, ast.Subscript):
        index = node.slice
        return (
            isinstance(index, ast.Constant)
            and isinstance(index.value, int | str)
            and (_is_input(node.value) or _guard_node(node.value))
        )
    if isinstance(node, ast.Call):
        func = node.func
        return (
            isinstance(func, ast.Attribute)
            and func.attr in _GUARD_METHODS
            and _is_input(func.value)
            and not node.keywords
            and all(isinstance(a, ast.Constant) and isinstance(a.value, int) for a in node.args)
        )
    return _operator_node(node, _guard_node)


def _is_input(node: ast.expr) -> bool:
    """``L``, ``L['x']``, ``L['x'][0]``...: the guarded inputs."""
    while isinstance(node, ast.Subscript):
        if not (isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, int | str)):
            return False
        node = node.value
    return isinstance(node, ast.Name) and node.id == "L"


@contextlib.contextmanager
def forced_weights_only() -> Iterator[None]:
    """Make every ``torch.load`` inside the block use ``weights_only=True`` (torch's own switch)."""
    with _ENV_LOCK:
        before = os.environ.get(_ENV)
        os.environ[_ENV] = "1"
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(_ENV, None)
            else:
                os.environ[_ENV] = before


def check_graph(path: Path, module: torch.nn.Module) -> None:
    """Refuse a loaded program whose graphs call anything but allowed operators.

    Raises:
        TeacherError: naming the archive and the target.
    """
    import math
    import operator

    import torch

    homes = {"_operator": operator, "math": math, "torch": torch}
    found = (getattr(homes[n.split(".")[0]], n.split(".")[1], None) for n in _PYTHON_TARGETS)
    python_targets = {t for t in found if t is not None}
    for sub in module.modules():
        graph = getattr(sub, "graph", None)
        if not isinstance(graph, torch.fx.Graph):
            continue
        for node in graph.nodes:
            if node.op not in ("call_function", "call_method"):
                continue
            target = node.target
            if node.op == "call_method" or not (
                target in python_targets
                or (
                    isinstance(target, torch._ops.OpOverload | torch._ops.OpOverloadPacket)
                    and _allowed_target(f"torch.ops.{target.namespace}.{_op_name(target)}")
                )
                or isinstance(target, torch._ops.HigherOrderOperator)
            ):
                raise _refuse(path, f"the loaded graph calls {target!r}")


def _op_name(target: object) -> str:
    name = str(getattr(target, "_name", "") or getattr(target, "__name__", ""))
    return name.split("::", 1)[-1]
