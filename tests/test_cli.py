"""The `fraud` command line describes every command and option, and `--help` works everywhere."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import typer.main

from fraud.cli import app

FRAUD = str(Path(sys.executable).with_name("fraud"))


def _walk(command, path=()):
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from _walk(sub, (*path, name))


def test_every_command_and_option_has_help_text():
    root = typer.main.get_command(app)
    undocumented = []
    for path, command in _walk(root):
        if path and not (command.help or command.short_help):
            undocumented.append(" ".join(path))
        for param in command.params:
            if param.param_type_name == "option" and param.name != "help" and not getattr(param, "help", None):
                undocumented.append(f"{' '.join(path)} --{param.name}")
    assert not undocumented, f"missing help text: {undocumented}"


def test_the_commands_the_readme_promises_exist():
    root = typer.main.get_command(app)
    names = set(root.commands)
    assert {"simulate", "features", "pipeline", "serve", "score", "deploy", "bench"} <= names


def test_help_runs_for_every_command_through_the_console_script():
    root = typer.main.get_command(app)
    for path, _ in _walk(root):
        result = subprocess.run([FRAUD, *path, "--help"], capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, (path, result.stderr)
        assert "Usage" in result.stdout, path
        assert "Traceback" not in result.stderr


def test_unknown_command_is_a_usage_error_not_a_traceback():
    result = subprocess.run([FRAUD, "no-such-command"], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "No such command" in result.stderr


def test_exit_codes_of_commands_reach_the_shell(tmp_path):
    """typer.Exit(code=N) inside a command must become the process exit code (click returns it
    instead of exiting when standalone mode is off)."""
    script = tmp_path / "exit_code.py"
    script.write_text(
        "import sys, typer\n"
        "from fraud import cli\n"
        "@cli.app.command('exit-with')\n"
        "def exit_with(code: int = typer.Option(..., help='code')) -> None:\n"
        "    raise typer.Exit(code=code)\n"
        "cli.main()\n"
    )
    for code in (0, 3):
        result = subprocess.run(
            [sys.executable, str(script), "exit-with", "--code", str(code)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == code, result.stderr
