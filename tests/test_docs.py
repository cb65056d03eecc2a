"""Docs and help stay true: every command teaches, README's commands match CI and the CLI."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

from calibrate_teacher.cli import app

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = sorted(c.name for c in typer.main.get_command(app).commands.values())


def test_all_commands_are_registered():
    assert {"evaluate", "fit", "bake"} <= set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help_with_examples(name):
    command = typer.main.get_command(app).commands[name]
    assert command.help and len(command.help.split()) > 8
    examples = command.help.split("Examples:")[-1]
    assert "Examples:" in command.help and f"calibrate-teacher {name}" in examples
    for param in command.params:
        if param.name != "help":
            assert getattr(param, "help", None) or param.param_type_name == "argument", (name, param.name)


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    match = re.search(r"<!-- test-command -->\s*```(?:console|bash)?\n\$? ?(.+?)\n```", readme)
    assert match, "README.md must mark its test command with <!-- test-command -->"
    assert match.group(1).strip() in ci


def test_readme_mentions_every_command():
    readme = (ROOT / "README.md").read_text()
    for name in COMMANDS:
        assert f"calibrate-teacher {name}" in readme, name


def test_changelog_follows_keep_a_changelog():
    text = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in text and "### Added" in text and "keepachangelog.com" in text


def test_module_entry_point_help():
    result = subprocess.run([sys.executable, "-m", "calibrate_teacher", "fit", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "--objective" in result.stdout
