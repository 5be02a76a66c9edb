"""The experiment config the workbench edits: applying one, field edits, reset to default,
and which edits reach the model Reconstruct uses.

A model built from the config (``model_source == "config"``) no longer matches
once the config changes, so it is dropped and rebuilt on the next use.

A *trained* model (an opened checkpoint, or this session's run) keeps the
weights it was trained with. Of its settings, the solve's can change on the
live model (:data:`OVERRIDABLE`: ``solver.*``, ``backward_solver.*``,
``deq.stepsize``, ``deq.relaxation``; what
``engine.diagnostics.inspect.apply_settings`` applies), so an edit of those
overrides the model's own value at the next Reconstruct. The rest of what
defines the model (:data:`FIXED_SECTIONS`) is fixed by its weights: such an
edit is refused for Reconstruct, with the reason, and applies to the next
Train. Training-only settings (optimiser, losses, ...) concern Train alone.

A field the settings dock refused (an invalid value) is kept in
``state.invalid_settings`` until it is corrected or the config is replaced;
while one is there, :func:`refuse_invalid_settings` stops Train and
Reconstruct and names it, so the previous value is never used silently.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Protocol

from engine.config import ExperimentConfig
from workbench.state import WorkbenchState, default_config

SOLVER_SECTIONS = ("solver", "backward_solver")
STEP_KEYS = ("deq.stepsize", "deq.relaxation")
#: what a trained model's weights were fitted to (deq.* except the step keys)
FIXED_SECTIONS = ("physics", "model", "deq")


def overridable(key: str) -> bool:
    """True for the settings a trained model can change live (its solvers and its step)."""
    return key.split(".", 1)[0] in SOLVER_SECTIONS or key in STEP_KEYS


def fixed_by_weights(key: str) -> bool:
    """True for the settings a trained model cannot change without training again."""
    return key.split(".", 1)[0] in FIXED_SECTIONS and not overridable(key)


def flat_settings(config: ExperimentConfig) -> dict[str, Any]:
    """``{"solver.tol": 1e-3, ...}``: every field of every section by its dotted key."""
    out = {}
    for section in dataclasses.fields(config):
        obj = getattr(config, section.name)
        for f in dataclasses.fields(obj):
            out[f"{section.name}.{f.name}"] = getattr(obj, f.name)
    return out


def changed_keys(old: ExperimentConfig, new: ExperimentConfig) -> list[str]:
    a, b = flat_settings(old), flat_settings(new)
    return [key for key in b if a.get(key) != b[key]]


def format_setting(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def allowed_values(key: str) -> str:
    """What ``key`` accepts, from the config's own field rules: "one of 'a', 'b'", "a number from 1e-06 to 10",
    ...; "" when its rule is not a range or a list (the config's error says it)."""
    section, _, name = key.partition(".")
    sections = {f.name: f for f in dataclasses.fields(ExperimentConfig)}
    if section not in sections:
        return ""
    owner = getattr(ExperimentConfig(), section)
    fields = {f.name: f for f in dataclasses.fields(owner)}
    if name not in fields:
        return ""
    meta, kind = fields[name].metadata, type(getattr(owner, name))
    if meta.get("choices"):
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    if kind is bool:
        return "true or false"
    if kind not in (int, float):
        return ""  # free text, or a field with its own rule (the error names it)
    what = "a whole number" if kind is int else "a number"
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and hi is not None:
        return f"{what} from {format_setting(lo)} to {format_setting(hi)}"
    if lo is not None:
        return f"{what} >= {format_setting(lo)}"
    if hi is not None:
        return f"{what} <= {format_setting(hi)}"
    return what


def refusal_message(key: str, text: str, error: str) -> str:
    """The settings dock's message for a refused field: the key, what was typed, why, what is allowed."""
    allowed = allowed_values(key)
    reason = error[len(key):].strip() if error.startswith(key) else error  # the config's error names the key too
    return f"{key} = {text.strip()} is refused: {reason}." + (f" Allowed: {allowed}." if allowed else "")


class SettingsRefusalView(Protocol):
    def set_status(self, text: str) -> None: ...
    def show_invalid_setting(self, key: str) -> None: ...
    def report_error(self, title: str, message: Any, log: bool = True) -> None: ...


def refuse_invalid_settings(view: SettingsRefusalView, state: WorkbenchState, action: str) -> bool:
    """True (and the user told which field, why and what is allowed) when a refused field blocks ``action``."""
    if not state.invalid_settings:
        return False
    key, message = next(iter(state.invalid_settings.items()))
    others = [k for k in state.invalid_settings if k != key]
    current = format_setting(flat_settings(state.config).get(key))
    view.set_status(f"{action} refused: the setting {key} is not valid (see Settings)")
    view.show_invalid_setting(key)
    view.report_error(f"{action} refused",
                      f"{message}\n\n{action} did not start: correct {key} in the settings first; its previous "
                      f"value ({current}) is not used in its place."
                      + (f"\nAlso not valid: {', '.join(others)}." if others else ""))
    return True


def edit_note(key: str, model_config: ExperimentConfig, config: ExperimentConfig,
              model_name: str) -> Optional[tuple[str, str]]:
    """(log level, text) saying what an edit of ``key`` does to a trained model's Reconstruct; None if nothing."""
    own = format_setting(flat_settings(model_config).get(key))
    new = format_setting(flat_settings(config).get(key))
    if overridable(key):
        if own == new:
            return "info", f"{key} is back to {model_name}'s own {own} for Reconstruct"
        return "info", f"{key} = {new} overrides {model_name}'s {own} at the next Reconstruct"
    if fixed_by_weights(key):
        return "warning", (f"{key} = {new} is not applied to {model_name}: a trained model's {key.split('.')[0]} "
                           f"settings are fixed by its weights, so Reconstruct keeps {own}; it applies to the "
                           "next Train")
    return None


class ConfigView(Protocol):
    def show_config(self, config: ExperimentConfig) -> None: ...
    def set_hu_range(self, hu_range: Optional[tuple]) -> None: ...
    def log_message(self, level: str, message: str) -> None: ...
    def set_status(self, text: str) -> None: ...


class ConfigPresenter:
    def __init__(self, view: ConfigView, state: WorkbenchState) -> None:
        self.view, self.state = view, state

    def set_config(self, config: ExperimentConfig, log: bool = True) -> None:
        """Use ``config`` everywhere: the state, the settings panel, the display window."""
        self.state.config = config
        self.state.invalid_settings.clear()  # the panel shows the new config: no field is refused any more
        self.view.show_config(config)
        self._drop_config_model()
        self.show_hu_range()
        if log:
            self.view.log_message("info", f"config: {config.run.name} ({config.physics.modality}, "
                                  f"{config.physics.img_size}px, {config.optim.steps} steps)")

    def edited(self, config: ExperimentConfig) -> None:
        """The settings panel accepted an edit (it already shows it)."""
        old, self.state.config = self.state.config, config
        self._drop_config_model()
        model_config = self.state.trained_config()
        if model_config is None:
            return
        for key in changed_keys(old, config):
            note = edit_note(key, model_config, config, self.state.trained_model_name())
            if note is not None:
                self.view.log_message(*note)
                self.view.set_status(note[1])

    def field_rejected(self, key: str, message: str) -> None:
        """The settings panel refused a field: it blocks Train and Reconstruct until corrected."""
        self.state.invalid_settings[key] = message
        self.view.log_message("warning", f"refused: {message}")
        self.view.set_status(f"{key}: not valid, Train and Reconstruct are blocked until it is corrected")

    def field_accepted(self, key: str) -> None:
        self.state.invalid_settings.pop(key, None)

    def reset(self) -> None:
        self.set_config(default_config())

    def show_hu_range(self) -> None:
        self.view.set_hu_range(self.state.hu_range())

    def _drop_config_model(self) -> None:
        if self.state.model_source == "config":
            self.state.set_model(None, "")
