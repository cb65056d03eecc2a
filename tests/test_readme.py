"""Every command README.md shows runs, in README order, from a fresh copy of ``examples/`` (#10).

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


def readme_commands() -> list[str]:
    """The ``$ ...`` lines of README's console blocks, without the install and test steps."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```console\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            if not line.startswith("$ "):
                continue
            steps = [s.strip() for s in line[2:].split("&&")]
            steps = [s for s in steps if not s.startswith(("pip ", "python -m pytest"))]
            commands.extend(steps)
    return commands


def test_readme_shows_the_commands_we_expect():
    commands = readme_commands()
    assert commands[0].startswith("calibrate-teacher fit examples/digits/teacher.onnx")
    assert any(c.startswith("calibrate-teacher export-soft-labels") for c in commands)


@pytest.mark.slow
def test_readme_commands_run_in_order_from_a_fresh_copy(tmp_path):
    shutil.copytree(ROOT / "examples", tmp_path / "examples",
                    ignore=shutil.ignore_patterns("*.calibrated.*", "__pycache__"))
    python = shlex.quote(sys.executable)
    env = {k: v for k, v in os.environ.items() if k != "CALIBRATE_TEACHER_DEBUG"}
    for command in readme_commands():
        line = re.sub(r"(^|\| )calibrate-teacher ", rf"\1{python} -m calibrate_teacher ", command)
        line = re.sub(r"\| python ", f"| {python} ", line)
        result = subprocess.run(line, shell=True, cwd=tmp_path, capture_output=True, text=True, env=env,
                                timeout=600)
        assert result.returncode == 0, f"{command}\n{result.stderr[-2000:]}"
        assert "Traceback" not in result.stderr, command
