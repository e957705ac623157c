"""Domain errors: each carries a message that says what is wrong and what to do.

Only the CLI turns them into a red one-line message and an exit code.
"""

from __future__ import annotations


class Phi2Error(Exception):
    """Base of every error a user can cause or fix; exit code 1 (runtime error)."""

    exit_code = 1


class ConfigError(Phi2Error):
    """An option or config file value is invalid; exit code 2 (usage error)."""

    exit_code = 2


class DataError(Phi2Error):
    """Input data is missing, malformed or unusable."""


class HubUnreachableError(Phi2Error):
    """The Hugging Face hub could not be reached (offline machine, no network)."""


class ModelError(Phi2Error):
    """A model, tokenizer or adapter could not be loaded or does not fit."""


class RunError(Phi2Error):
    """A run directory is missing, incomplete, or would be overwritten."""


class DeviceError(Phi2Error):
    """The requested device or precision is not available on this machine."""


class TrainingInterrupted(Phi2Error):
    """Training stopped on Ctrl-C or SIGTERM after saving a resumable checkpoint."""

    exit_code = 130
