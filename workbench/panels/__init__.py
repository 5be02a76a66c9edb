"""Dockable panels. Each panel is a Qt-free model module (``*_model.py``: the logic,
importable and testable without Qt) and a QWidget module that draws the model on
a timer; :mod:`workbench.panels.plotting` holds the shared pyqtgraph set-up."""
