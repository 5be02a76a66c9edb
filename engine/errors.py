"""Exceptions the engine raises for things a user did or supplied.

Every error a user can cause (a bad file, a mismatched checkpoint, an invalid
config value, a diverging solve) is one of these, carries a one-line message
that names the culprit, and is caught by the CLI and the GUI to be shown
instead of a traceback.
"""


class EquiDEQError(Exception):
    """Base class: a user-facing failure with a one-line, specific message."""


class ConfigError(EquiDEQError, ValueError):
    """An unknown key, wrong type or out-of-range value in a config."""


class ScanError(EquiDEQError):
    """A scan or measurement file that cannot be read as asked."""


class CheckpointError(EquiDEQError):
    """A checkpoint that is corrupt, unsafe, or does not match the model."""


class SolverError(EquiDEQError):
    """A fixed-point solve that diverged or produced non-finite values."""
