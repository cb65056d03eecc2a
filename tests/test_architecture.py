"""The import direction (#9): cli -> jobs -> library modules -> errors, and no cycles between peers.

``teachers/`` and ``data/`` do not import each other (data asks a loaded teacher through its
protocol), ``soft_labels/`` imports neither (the cache format needs no teacher), and nothing but
the CLI's own entry points imports ``cli/``. Imports under ``if TYPE_CHECKING:`` are type
annotations only and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "calibrate_teacher"


def _runtime_imports(path: Path) -> set[str]:
    """Every ``calibrate_teacher...`` module a file imports when it runs (function bodies too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("calibrate_teacher")}


def _files(subpackage: str) -> list[Path]:
    return sorted((PACKAGE / subpackage).rglob("*.py"))


def _offenders(subpackage: str, banned: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in _files(subpackage)
        for name in sorted(_runtime_imports(path))
        if name.startswith(banned)
    ]


@pytest.mark.parametrize(
    ("subpackage", "banned"),
    [
        ("teachers", ("calibrate_teacher.data", "calibrate_teacher.jobs", "calibrate_teacher.cli")),
        ("data", ("calibrate_teacher.teachers", "calibrate_teacher.jobs", "calibrate_teacher.cli")),
        (
            "soft_labels",
            ("calibrate_teacher.teachers", "calibrate_teacher.data", "calibrate_teacher.jobs", "calibrate_teacher.cli"),
        ),
        ("jobs", ("calibrate_teacher.cli",)),
    ],
)
def test_import_direction(subpackage, banned):
    assert _offenders(subpackage, banned) == []


def test_nothing_outside_cli_imports_cli():
    outside = [p for p in PACKAGE.rglob("*.py") if "cli" not in p.relative_to(PACKAGE).parts]
    offenders = [
        str(p.relative_to(PACKAGE.parent))
        for p in outside
        if p.name != "__main__.py" and any(n.startswith("calibrate_teacher.cli") for n in _runtime_imports(p))
    ]
    assert offenders == []


def test_library_modules_do_not_import_the_jobs():
    library = [
        p for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py", "specs.py")
    ]
    offenders = [
        str(p.relative_to(PACKAGE.parent))
        for p in library
        if any(n.startswith("calibrate_teacher.jobs") for n in _runtime_imports(p))
    ]
    assert offenders == []


def test_the_checker_sees_a_runtime_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from calibrate_teacher.data import x\n"
        "def f():\n    from calibrate_teacher.teachers import y\n"
    )
    assert _runtime_imports(probe) == {"calibrate_teacher.teachers"}
