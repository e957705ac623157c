"""`--help` of every command at 80 columns: every option name whole, no <bool> on flags."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from phi2cli.cli import app

runner = CliRunner()
COMMANDS = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def test_every_command_is_covered():
    assert COMMANDS == ["config", "evaluate", "export", "prepare", "report", "serve", "summarize", "train"]


@pytest.mark.parametrize("name", [None, *COMMANDS])
def test_help_at_80_columns_shows_every_option_name_whole(name):
    args = [name, "--help"] if name else ["--help"]
    result = runner.invoke(app, args, env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    out = result.output
    command = typer.main.get_command(app)
    params = command.commands[name].params if name else command.params  # type: ignore[attr-defined]
    names = [flag for p in params if p.param_type_name == "option" for flag in p.opts + p.secondary_opts]
    assert len(names) >= 2
    tokens = set(re.findall(r"(?<![\w-])--?[\w-]+", out))  # every flag-like word as printed, never cut
    assert set(names) <= tokens, set(names) - tokens
    assert "<bool>" not in out and "…" not in out
    assert max(len(line) for line in out.splitlines()) <= 80
    if name == "train":  # the long names that used to be cut, and a switch's default named by its flag
        assert "--lr, --learning-rate <float>" in out
        assert "--gradient-checkpointing / --no-gradient-checkpointing" in out
        assert "[default: --compile]" in " ".join(out.split())
