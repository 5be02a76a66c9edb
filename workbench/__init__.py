"""EquiDEQ Workbench: the PySide6 + pyqtgraph desktop front end of the engine.

The workbench owns no numerics beyond turning arrays into display images; the
engine (:mod:`engine`) runs in a worker thread and reports through events.
"""

# the package's one version (pyproject reads it there too): the same as `equideq --version`
from engine import __version__  # noqa: F401 - engine/__init__.py imports nothing heavy
