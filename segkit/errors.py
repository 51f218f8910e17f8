"""Errors that segkit reports to users as one line (no traceback)."""

from __future__ import annotations


class SegkitError(Exception):
    """Base class: a problem the user can fix; the message says what and where."""


class ConfigError(SegkitError):
    """A config value is wrong. The message starts with the config key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key


class DataError(SegkitError):
    """A data file is missing, unreadable or inconsistent. The message starts with the file."""


class CheckpointError(SegkitError):
    """A checkpoint cannot be written or read."""


class UntrustedConfigError(SegkitError):
    """A config from a file someone else may have written asks for something outside segkit's allowlist.

    The message names the file, the config key and the value, and how to opt out for a trusted file."""


def one_line(error: BaseException) -> str:
    """The user-facing line of an error, also when a DataLoader worker wrapped it in its traceback."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    last = lines[-1]
    # DataLoader re-raises worker errors as "Caught X in DataLoader worker...\n<traceback>\nmodule.X: msg".
    prefix = f"{type(error).__module__}.{type(error).__name__}: "
    return last.removeprefix(prefix)
