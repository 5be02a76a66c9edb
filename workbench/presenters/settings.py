"""What the workbench keeps between sessions, and how it is read back.

Kept: the window geometry and dock layout (opaque values the window gets from
and gives back to Qt), the recent files, the last config (JSON), the size
Reconstruct runs at, the last folder a file dialog used and whether the welcome
hint was dismissed. The settings of a restored config that differ from the
defaults are announced (:meth:`SettingsPresenter.announcement`), with "Reset
to defaults" one click away in the window. The store is anything with QSettings' ``value`` /
``setValue`` / ``sync``: the window passes its QSettings, tests a dict.
Unreadable values (another version, a hand-edited file) are skipped and the
defaults stay.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

from engine.config import ExperimentConfig
from engine.errors import EquiDEQError
from workbench.presenters.config import changed_keys, flat_settings, format_setting
from workbench.state import SIZE_CHOICES, WorkbenchState, default_config

GEOMETRY_KEY = "window/geometry"
DOCK_LAYOUT_KEY = "window/state"
RECENT_KEY = "recent"
CONFIG_KEY = "config/last"
LAST_DIR_KEY = "paths/last_dir"
SIZE_KEY = "viewer/reconstruct_size"
WELCOME_DISMISSED_KEY = "hints/welcome_dismissed"
#: how many restored settings the announcement names before "and N more"
NAMED_SETTINGS = 4


def restored_changes(config: ExperimentConfig, defaults: Optional[ExperimentConfig] = None) -> list[str]:
    """``key = value`` for every setting of ``config`` that differs from the defaults."""
    defaults = defaults if defaults is not None else default_config()
    values = flat_settings(config)
    return [f"{key} = {format_setting(values[key])}" for key in changed_keys(defaults, config)]


class SettingsStore(Protocol):
    def value(self, key: str, defaultValue: Any = None) -> Any: ...
    def setValue(self, key: str, value: Any) -> None: ...
    def sync(self) -> None: ...


@dataclass
class WindowLayout:
    """The window's geometry and dock layout, as Qt saves them (bytes-like; None when not saved)."""

    geometry: Any = None
    docks: Any = None


class SettingsPresenter:
    def __init__(self, store: SettingsStore, state: WorkbenchState,
                 working_dir: Callable[[], str] = os.getcwd) -> None:
        self.store, self.state = store, state
        self.working_dir = working_dir
        self.restored: list[str] = []  # the restored config's settings that differ from the defaults

    def restore(self, restore_config: bool = True) -> Optional[ExperimentConfig]:
        """Read the recent files into the state; return the last session's config to use, if any.

        A config whose data files have gone falls back to the built-in phantoms.
        """
        try:
            self.state.recent_from_list(json.loads(self.store.value(RECENT_KEY, "[]") or "[]"))
        except (TypeError, ValueError):
            pass
        size = str(self.store.value(SIZE_KEY, "model") or "model")
        self.state.reconstruct_size = size if size in SIZE_CHOICES else "model"
        self.restored = [f"Reconstruct size = {size}"] if self.state.reconstruct_size != "model" else []
        text = self.store.value(CONFIG_KEY, "") if restore_config else ""
        if not text:
            return None
        try:
            config = ExperimentConfig.from_dict(json.loads(text))
            if config.data.source == "files" and not all(os.path.exists(p) for p in config.data.paths or []):
                config = config.replace(**{"data.source": "phantom", "data.paths": []})
        except (ValueError, TypeError, EquiDEQError):
            return None  # settings from another version: keep the default
        self.restored = restored_changes(config) + self.restored
        return config

    def announcement(self) -> str:
        """"restored N settings from the last session: …" ("" when the restored config is the default one)."""
        changes = self.restored
        if not changes:
            return ""
        named = ", ".join(changes[:NAMED_SETTINGS])
        more = f" and {len(changes) - NAMED_SETTINGS} more" if len(changes) > NAMED_SETTINGS else ""
        return (f"restored {len(changes)} setting{'s' if len(changes) > 1 else ''} from the last session: "
                f"{named}{more}")

    def welcome_dismissed(self) -> bool:
        return str(self.store.value(WELCOME_DISMISSED_KEY, "false")).lower() in ("true", "1")

    def dismiss_welcome(self, dismissed: bool = True) -> None:
        self.store.setValue(WELCOME_DISMISSED_KEY, "true" if dismissed else "false")
        self.store.sync()

    def window_layout(self) -> WindowLayout:
        return WindowLayout(self.store.value(GEOMETRY_KEY), self.store.value(DOCK_LAYOUT_KEY))

    def save(self, layout: WindowLayout) -> None:
        self.store.setValue(GEOMETRY_KEY, layout.geometry)
        self.store.setValue(DOCK_LAYOUT_KEY, layout.docks)
        self.store.setValue(RECENT_KEY, json.dumps(self.state.recent_as_list()))
        self.store.setValue(CONFIG_KEY, json.dumps(self.state.config.to_dict()))
        self.store.setValue(SIZE_KEY, self.state.reconstruct_size)
        self.store.sync()

    def last_dir(self) -> str:
        """Where the next file dialog starts: the folder last used, else the working directory."""
        return str(self.store.value(LAST_DIR_KEY, self.working_dir()) or self.working_dir())

    def remember_dir(self, path: str) -> None:
        folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        self.store.setValue(LAST_DIR_KEY, folder)
