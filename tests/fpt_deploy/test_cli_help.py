"""``--help`` on a standard 80-column terminal: every option name of every command whole, no line wider."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from fpt_deploy.cli import app

COMMAND = typer.main.get_command(app)


def _option_names(command) -> list[str]:
    return [
        name
        for p in command.params
        if p.param_type_name == "option" and not getattr(p, "hidden", False)
        for name in (*p.opts, *p.secondary_opts)
    ]


@pytest.mark.parametrize("name", sorted(COMMAND.commands))
def test_every_option_name_is_whole_at_80_columns(name):
    result = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    names = [*_option_names(COMMAND.commands[name]), "--help"]
    if name == "serve":  # the command whose long names were cut once (--max-queue-delay-ms, --model-control-mode)
        assert len(names) > 20 and "--max-queue-delay-ms" in names
    words = set(result.output.replace(",", " ").replace("/", " ").split())
    cut = [n for n in names if n not in words]
    assert not cut, f"`fpt-deploy {name} --help` at 80 columns cuts {cut}:\n{result.output}"
    wide = [line for line in result.output.splitlines() if len(line) > 80]
    assert not wide, f"lines wider than 80 columns: {wide}"
    assert "…" not in result.output
    assert "\\[" not in result.output, "rich markup escapes show as-is in plain click help"


def test_the_top_level_help_fits_too():
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0 and "--verbose" in result.output and "build-engine" in result.output
    assert all(len(line) <= 80 for line in result.output.splitlines())
