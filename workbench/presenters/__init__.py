"""The workbench's presenters: what the GUI does, without Qt.

Each presenter gets a small view (an object with methods such as ``log``,
``set_status`` or ``show_actions``; the main window is the real one, tests pass
a fake) and the Qt-free state (:class:`~workbench.state.WorkbenchState`, the
panels' ``*_model`` objects). Nothing in this package imports PySide6 or
pyqtgraph; slow work goes to a task runner (anything with the
:class:`~workbench.worker.TaskRunner` ``submit`` signature) and results come
back through its ``on_done`` in the GUI thread.

* :mod:`.run` -- the training run's life cycle (:class:`~.run.RunPhase`) and the
  commands Train / Pause / Stop / Keep iterate / close.
* :mod:`.events` -- routes engine events to the panels and the status bar.
* :mod:`.config` -- applying, editing and resetting the experiment config.
* :mod:`.files` -- opening and saving scans, checkpoints, configs and exports.
* :mod:`.analysis` -- Reconstruct, equivariance probes and metrics, with
  the model chosen without touching a running trainer.
* :mod:`.settings` -- what is persisted between sessions.
* :mod:`.inspector` -- the Solver Inspector: recorded solves, measurements,
  diagnoses, replays and remedies.
* :mod:`.divergence` -- the divergence alarm, pausing on it, and the built-in
  divergence demonstration.
"""
