"""EquiDEQ Workbench: the PySide6 + pyqtgraph desktop front end of the engine.

The workbench owns no numerics beyond turning arrays into display images; the
engine (:mod:`engine`) runs in a worker thread and reports through events.
"""

__version__ = "0.1.0"
