"""Errors a user sees: one line each, with docker's exit codes."""

from __future__ import annotations


class KataError(Exception):
    """kata-py itself failed (docker's 125)."""

    exit_code = 125


class ConfigError(KataError):
    pass


class VMError(KataError):
    """The VM could not be started or stopped working."""


class CommandNotExecutable(KataError):
    exit_code = 126


class CommandNotFound(KataError):
    exit_code = 127
