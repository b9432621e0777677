"""User-facing errors.

Every error that bad input can cause (a wrong config key, a missing file, a
checkpoint from another architecture) is raised as a ``DForgeError`` whose
message is one line naming the problem. The CLI prints it as
``dforge: error: <message>`` and exits with status 2; it never shows a
traceback for these.
"""


class DForgeError(Exception):
    """Base class: a problem with the user's input, reported in one line."""


class ConfigError(DForgeError):
    """A config key is unknown, or its value has the wrong type or range."""


class DataError(DForgeError):
    """A data file or folder is missing, truncated or malformed."""


class CheckpointError(DForgeError):
    """A run directory, weights file or checkpoint is missing or does not fit."""
