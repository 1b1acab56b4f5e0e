"""User-facing errors.

Every problem caused by the user's input (a name, a path, a file, a config value) is raised as an
:class:`AutoPruneError` whose message names the problem *and* the fix. The CLI prints such errors without a
traceback and exits with :data:`EXIT_USER_ERROR`; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import ClassVar

EXIT_USER_ERROR = 2


class AutoPruneError(Exception):
    """An error caused by user input, with an actionable message.

    Args:
        message: What is wrong.
        hint: How to fix it (appended to the message as ``hint: ...``); without one, the CLI prints the class's
            :attr:`default_hint`.
    """

    #: The fix the CLI suggests when a raise site gives no hint of its own.
    default_hint: ClassVar[str] = "check the value or path named above; `autoprune COMMAND --help` lists the options"

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  hint: {hint}")


class ConfigError(AutoPruneError, ValueError):
    """A configuration value is missing, unknown or of the wrong type."""

    default_hint = ("fix the value named above (the config file, a KEY=VALUE override or an option); "
                    "`autoprune COMMAND --help` lists the options")


class CheckpointError(AutoPruneError):
    """A checkpoint file is missing, corrupt, unsafe or does not fit the model."""

    default_hint = ("the file is damaged, changed or not what the command expects: write it again (autoprune "
                    "train / export) or point at another file")


class DataError(AutoPruneError):
    """A dataset is missing, corrupt, or fails its checksum."""

    default_hint = "check the dataset's files and --data-dir / dataset.data_dir (`autoprune list datasets`)"
