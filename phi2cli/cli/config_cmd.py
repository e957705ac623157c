"""`phi2 config`: print the resolved configuration as YAML, to start a config file from."""

from __future__ import annotations

from phi2cli.cli.app import ConfigOpt, command, console, load_config
from phi2cli.config import dump_yaml


@command("config")
def config_command(config: ConfigOpt = None) -> None:
    """Print the configuration (defaults, or --config FILE resolved) as YAML.

    Save it with 'phi2 config > phi2.yaml', edit it, then pass '--config phi2.yaml' to any command.
    """
    console.print(dump_yaml(load_config(config, {})), end="", markup=False, highlight=False)
