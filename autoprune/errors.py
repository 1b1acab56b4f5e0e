"""User-facing errors.

Every problem caused by the user's input (a name, a path, a file, a config value) is raised as an
:class:`AutoPruneError` whose message names the problem *and* the fix. The CLI prints such errors without a
traceback and exits with :data:`EXIT_USER_ERROR`; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class AutoPruneError(Exception):
    """An error caused by user input, with an actionable message.

    Args:
        message: What is wrong.
        hint: How to fix it (appended to the message as ``hint: ...``).
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  hint: {hint}")


class ConfigError(AutoPruneError, ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


class CheckpointError(AutoPruneError):
    """A checkpoint file is missing, corrupt, unsafe or does not fit the model."""


class DataError(AutoPruneError):
    """A dataset is missing, corrupt, or fails its checksum."""
