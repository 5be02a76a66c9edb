"""The experiment config the workbench edits: applying one, field edits, reset to default.

A model built from the config (``model_source == "config"``) no longer matches
once the config changes, so it is dropped and rebuilt on the next use.
"""

from __future__ import annotations

from typing import Optional, Protocol

from engine.config import ExperimentConfig
from workbench.state import WorkbenchState, default_config


class ConfigView(Protocol):
    def show_config(self, config: ExperimentConfig) -> None: ...
    def set_hu_range(self, hu_range: Optional[tuple]) -> None: ...
    def log_message(self, level: str, message: str) -> None: ...


class ConfigPresenter:
    def __init__(self, view: ConfigView, state: WorkbenchState) -> None:
        self.view, self.state = view, state

    def set_config(self, config: ExperimentConfig, log: bool = True) -> None:
        """Use ``config`` everywhere: the state, the settings panel, the display window."""
        self.state.config = config
        self.view.show_config(config)
        self._drop_config_model()
        self.show_hu_range()
        if log:
            self.view.log_message("info", f"config: {config.run.name} ({config.physics.modality}, "
                                  f"{config.physics.img_size}px, {config.optim.steps} steps)")

    def edited(self, config: ExperimentConfig) -> None:
        """The settings panel accepted an edit (it already shows it)."""
        self.state.config = config
        self._drop_config_model()

    def reset(self) -> None:
        self.set_config(default_config())

    def show_hu_range(self) -> None:
        self.view.set_hu_range(self.state.hu_range())

    def _drop_config_model(self) -> None:
        if self.state.model_source == "config":
            self.state.set_model(None, "")
