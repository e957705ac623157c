"""The `phi2` command line: thin commands over the core engine, one module each."""

from phi2cli.cli.app import app, main

# Importing a command module registers its command on `app`.
from phi2cli.cli import config_cmd, evaluate, export, prepare, report, serve, summarize, train  # noqa: E402,F401

__all__ = ["app", "main"]
