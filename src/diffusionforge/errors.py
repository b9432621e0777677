"""User-facing errors.

Every error that bad input can cause (a wrong config key, a missing file, a
checkpoint from another architecture) is raised as a ``DForgeError`` whose
message is one line naming the problem. The CLI prints it as
``dforge: error: <message>`` and exits with the error's ``exit_status``
(2 for bad input, 3 for a training run that failed, e.g. diverged); it never
shows a traceback for these.
"""


class DForgeError(Exception):
    """Base class: a problem with the user's input, reported in one line."""

    exit_status = 2  # what `dforge` exits with


def one_line(err: DForgeError) -> str:
    """The message of ``err``. A DataLoader worker's error reaches the main process re-raised with
    the worker's traceback as its message; its last line, ``module.Class: message``, is the message."""
    lines = str(err).strip().splitlines()
    prefix = f"{type(err).__module__}.{type(err).__name__}: "
    if len(lines) > 1 and lines[-1].startswith(prefix):
        return lines[-1][len(prefix):]
    return " ".join(line.strip() for line in lines)


class ConfigError(DForgeError):
    """A config key is unknown, or its value has the wrong type or range."""


class DataError(DForgeError):
    """A data file or folder is missing, truncated or malformed."""


class CheckpointError(DForgeError):
    """A run directory, weights file or checkpoint is missing or does not fit."""


class TrainingError(DForgeError):
    """Training could not go on (e.g. the loss or gradients became non-finite)."""

    exit_status = 3
