"""Every command and snippet README.md shows runs, in README order, from a fresh copy of ``examples/`` (#10).

The install steps (``pip install ...``) are what CI itself runs; the rest is run here, each line
as a newcomer would paste it, in a folder that holds nothing but a copy of ``examples/``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_steps() -> list[tuple[str, str]]:
    """``("shell", line)`` for each ``$ ...`` line and ``("python", code)`` for each python block,
    in README order, without the install and test steps."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    steps: list[tuple[str, str]] = []
    for kind, block in re.findall(r"```(console|python)\n(.*?)```", text, flags=re.S):
        if kind == "python":
            steps.append(("python", block))
            continue
        for line in block.splitlines():
            if line.startswith("$ "):
                parts = [s.strip() for s in line[2:].split("&&")]
                steps += [("shell", s) for s in parts if not s.startswith(("pip ", "python -m pytest"))]
    return steps


def readme_commands() -> list[str]:
    """The shell commands README shows, in order."""
    return [step for kind, step in readme_steps() if kind == "shell"]


def test_readme_shows_the_commands_we_expect():
    commands = readme_commands()
    assert commands[0].startswith("calibrate-teacher fit examples/digits/teacher.onnx")
    assert any(c.startswith("calibrate-teacher export-soft-labels") for c in commands)


@pytest.mark.slow
def test_readme_commands_run_in_order_from_a_fresh_copy(tmp_path):
    shutil.copytree(ROOT / "examples", tmp_path / "examples",
                    ignore=shutil.ignore_patterns("*.calibrated.*", "*-calibrated", "__pycache__"))
    python = shlex.quote(sys.executable)
    env = {k: v for k, v in os.environ.items() if k != "CALIBRATE_TEACHER_DEBUG"}
    for kind, step in readme_steps():
        if kind == "python":  # each snippet runs on its own, as pasted into a fresh file
            result = subprocess.run([sys.executable, "-c", step], cwd=tmp_path, capture_output=True, text=True,
                                    env=env, timeout=600)
        else:
            line = re.sub(r"(^|\| )calibrate-teacher ", rf"\1{python} -m calibrate_teacher ", step)
            line = re.sub(r"\| python ", f"| {python} ", line)
            result = subprocess.run(line, shell=True, cwd=tmp_path, capture_output=True, text=True, env=env,
                                    timeout=600)
        assert result.returncode == 0, f"{step}\n{result.stderr[-2000:]}"
        assert "Traceback" not in result.stderr, step
