"""Exceptions the engine raises for things a user did or supplied.

Every error a user can cause (a bad file, a mismatched checkpoint, an invalid
config value) is one of these, carries a one-line message that names the
culprit, and is caught by the CLI and the GUI to be shown instead of a
traceback. A fixed-point solve that diverges is not an exception: it is a
result, reported per sample in ``SolveStats.stop_reasons``
(:mod:`engine.solver_names`); the fallback solver retries those samples and
the trainer skips a step that has one.
"""


class EquiDEQError(Exception):
    """Base class: a user-facing failure with a one-line, specific message."""


class ConfigError(EquiDEQError, ValueError):
    """An unknown key, wrong type or out-of-range value in a config."""


class ScanError(EquiDEQError):
    """A scan or measurement file that cannot be read as asked."""


class CheckpointError(EquiDEQError):
    """A checkpoint that is corrupt, unsafe, or does not match the model."""
