"""Whether a checkpoint fits: the current config, the model it is loaded into, and the run it resumes.

Owns :func:`compare_configs` / :func:`check_compatible` (physics and denoiser
architecture against the current config, in sentences the CLI and GUI show),
:func:`check_state_matches` (a ``state_dict`` against a module) and
:func:`check_resume_state` (the stored optimiser and scheduler states against
the objects they are loaded into, checked before anything is loaded).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Mapping, Optional

import torch

from engine.checkpoint.format import Checkpoint
from engine.checkpoint.safety import shape_text, short_reason
from engine.config import ExperimentConfig, ModelConfig, PhysicsConfig
from engine.errors import CheckpointError


# ---------------------------------------------------------------------------------------
# Compatibility with the current config and model
# ---------------------------------------------------------------------------------------

def _physics_phrase(p: PhysicsConfig, details: set[str]) -> str:
    size = f"{p.img_size}x{p.img_size}"
    if p.modality == "ct":
        extra = ""
        if "circle" in details:
            extra = " restricted to the inscribed circle" if p.circle else " over the full square"
        return f"{p.views}-view CT{extra} at {size}"
    extra = []
    if "center_fraction" in details:
        extra.append(f"centre fraction {p.center_fraction:g}")
    if "mask_seed" in details:
        extra.append(f"mask seed {p.mask_seed}")
    tail = f" ({', '.join(extra)})" if extra else ""
    return f"{p.acceleration:g}x-accelerated MRI with a {p.mask} mask at {size}{tail}"


def _denoiser_phrase(m: ModelConfig) -> str:
    norm = "group norm" if m.norm == "group" else "no norm"
    sn = "spectral norm" if m.spectral_norm else "no spectral norm"
    return f"a {m.denoiser} denoiser ({m.channels} channels, depth {m.depth}, {norm}, {sn})"


_PHYSICS_FIELDS = {"ct": ("views", "circle"), "mri": ("acceleration", "mask", "center_fraction", "mask_seed")}
_ARCH_FIELDS = ("denoiser", "channels", "depth", "norm", "spectral_norm")


def compare_configs(trained: ExperimentConfig, current: ExperimentConfig) -> list[str]:
    """Differences that make the trained weights unusable or change what they mean.

    Compared: the physics (modality, image size, CT views and circle, MRI
    acceleration, mask, centre fraction and mask seed) and the denoiser
    architecture (denoiser, channels, depth, norm, spectral_norm). Each entry
    is one human-readable sentence, e.g. ``"checkpoint was trained for 60-view
    CT at 128x128; current config is 30-view CT at 128x128"``. Empty when
    compatible. Solver, loss, optimiser and data settings are free to differ.
    """
    out = []
    tp, cp = trained.physics, current.physics
    details: set[str] = set()
    if tp.modality == cp.modality:
        details = {f for f in _PHYSICS_FIELDS[tp.modality] if getattr(tp, f) != getattr(cp, f)}
    if tp.modality != cp.modality or tp.img_size != cp.img_size or details:
        hidden = details & {"circle", "center_fraction", "mask_seed"}
        out.append(f"checkpoint was trained for {_physics_phrase(tp, hidden)}; "
                   f"current config is {_physics_phrase(cp, hidden)}")
    tm, cm = trained.model, current.model
    if any(getattr(tm, f) != getattr(cm, f) for f in _ARCH_FIELDS):
        out.append(f"checkpoint was trained with {_denoiser_phrase(tm)}; "
                   f"current config has {_denoiser_phrase(cm)}")
    return out


def check_compatible(ckpt: Checkpoint, current: ExperimentConfig) -> ExperimentConfig:
    """Raise :class:`CheckpointError` if ``ckpt`` cannot be used as-is with ``current``.

    The message lists every difference from :func:`compare_configs` and says
    that the checkpoint's own config can be adopted instead. The raised error
    carries ``differences`` (the list) and ``trained_config`` (the
    checkpoint's validated :class:`ExperimentConfig`) for the CLI / GUI to
    offer that. Returns the checkpoint's config when compatible.
    """
    trained = ckpt.experiment_config()
    diffs = compare_configs(trained, current)
    if diffs:
        listed = diffs[0] if len(diffs) == 1 else " ".join(f"({i}) {d};" for i, d in enumerate(diffs, 1)).rstrip(";")
        err = CheckpointError(f"{ckpt.name} does not match the current config: {listed}. "
                              "Adopt the checkpoint's config to use it as trained.")
        err.differences = diffs
        err.trained_config = trained
        raise err
    return trained


def check_state_matches(model_state: Mapping[str, torch.Tensor], module: torch.nn.Module, *,
                        name: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` unless ``model_state`` fits ``module.state_dict()`` exactly.

    The message names the first missing key, else the first unexpected key,
    else the first shape mismatch (with both shapes), and how many other
    problems there are. ``name`` (e.g. the file name) starts the message.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in model_state]
    unexpected = [k for k in model_state if k not in expected]
    shapes = [k for k in expected if k in model_state and tuple(model_state[k].shape) != tuple(expected[k].shape)]
    problems = ([f"key '{k}' is missing from the checkpoint" for k in missing]
                + [f"the checkpoint has unexpected key '{k}'" for k in unexpected]
                + [f"'{k}' has shape {shape_text(model_state[k])} in the checkpoint but {shape_text(expected[k])} "
                   "in the model" for k in shapes])
    if problems:
        more = f" ({len(problems) - 1} more mismatches)" if len(problems) > 1 else ""
        raise CheckpointError(f"{name} does not fit the model: {problems[0]}{more}")


# ---------------------------------------------------------------------------------------
# Resuming: the stored optimiser / scheduler states against the objects they go into
# ---------------------------------------------------------------------------------------

#: Per-parameter state every non-empty entry of these optimisers holds (a missing one
#: makes ``load_state_dict`` or the next step fail with a KeyError).
_REQUIRED_PARAM_STATE = {"Adam": ("step", "exp_avg", "exp_avg_sq"), "AdamW": ("step", "exp_avg", "exp_avg_sq")}
#: Optimiser flags that change how a step runs (on which devices, with which kernels):
#: a stored value must agree with the optimiser's own (None and False alike).
_EXECUTION_FLAGS = ("capturable", "differentiable", "fused")
#: Scheduler fields that must be positive (a zero period divides by zero in ``step()``).
_POSITIVE_SCHEDULER_FIELDS = ("T_max", "step_size", "T_0", "total_steps")


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kind_problem(saved: Any, current: Any) -> Optional[str]:
    """Why ``saved`` cannot stand in for ``current`` (a hyper-parameter / scheduler field), or None."""
    if isinstance(current, bool):
        return None if isinstance(saved, bool) else f"should be true or false, found {_describe(saved)}"
    if current is None:
        if saved is None or isinstance(saved, (bool, str)) or (_is_real(saved) and math.isfinite(saved)):
            return None
        return f"should be a flag or a number, found {_describe(saved)}"
    if _is_real(current) or (isinstance(current, torch.Tensor) and current.numel() == 1):
        if isinstance(saved, torch.Tensor) and isinstance(current, torch.Tensor) and saved.numel() == 1:
            saved = float(saved)
        if not _is_real(saved):
            return f"should be a number, found {_describe(saved)}"
        return None if math.isfinite(saved) else f"should be a finite number, found {saved}"
    if isinstance(current, (list, tuple)):
        if not isinstance(saved, (list, tuple)):
            return f"should be a list of {len(current)}, found {_describe(saved)}"
        if len(saved) != len(current):
            return f"has {len(saved)} entries, the current one {len(current)}"
        for i, (s, c) in enumerate(zip(saved, current)):
            problem = _kind_problem(s, c)
            if problem:
                return f"entry {i} {problem}"
        return None
    if isinstance(current, str):
        return None if isinstance(saved, str) else f"should be a string, found {_describe(saved)}"
    if isinstance(current, Mapping):
        return None if isinstance(saved, Mapping) else f"should be a dict, found {_describe(saved)}"
    return None if type(saved) is type(current) else f"should be a {type(current).__name__}, found {_describe(saved)}"


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {shape_text(value)}"
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    return f"a {type(value).__name__}"


def _check_optimizer_state(state: Any, optimizer: torch.optim.Optimizer, fail) -> None:
    if not isinstance(state, Mapping):
        fail(f"optimizer_state is {_describe(state)}, not a dict")
    saved_state, groups = state.get("state"), state.get("param_groups")
    if not isinstance(saved_state, Mapping):
        fail(f"optimizer_state['state'] should be a dict of per-parameter states, found {_describe(saved_state)}")
    if not isinstance(groups, (list, tuple)):
        fail(f"optimizer_state['param_groups'] should be a list, found {_describe(groups)}")
    current = optimizer.param_groups
    if len(groups) != len(current):
        fail(f"the optimiser state has {len(groups)} parameter groups, the model's optimiser {len(current)}")
    params: dict[int, torch.Tensor] = {}
    flags: dict[int, Mapping] = {}
    for gi, (group, now) in enumerate(zip(groups, current)):
        where = f"optimizer_state['param_groups'][{gi}]"
        if not isinstance(group, Mapping):
            fail(f"{where} should be a dict, found {_describe(group)}")
        ids = group.get("params")
        if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            fail(f"{where}['params'] should be a list of parameter indices, found {_describe(ids)}")
        if len(ids) != len(now["params"]):
            fail(f"parameter group {gi} holds {len(ids)} parameters in the checkpoint but {len(now['params'])} "
                 "in the model's optimiser")
        for index, param in zip(ids, now["params"]):
            if index in params:
                fail(f"parameter index {index} appears twice in optimizer_state['param_groups']")
            params[index] = param
            flags[index] = group
        for key, value in now.items():
            if key in ("params", "param_names"):
                continue
            if key not in group:
                if key != "initial_lr" and (_is_real(value) or isinstance(value, (tuple, list, torch.Tensor))):
                    fail(f"{where} has no '{key}'")
                continue  # a flag that newer PyTorch versions add with its default when loading
            problem = _kind_problem(group[key], value)
            if problem:
                fail(f"{where}['{key}'] {problem}")
            if key in _EXECUTION_FLAGS and bool(group[key]) != bool(value):
                fail(f"{where}['{key}'] is {group[key]!r}, this optimiser runs with {value!r}")
        _check_hyper_parameters(group, optimizer, where, fail)
    required = _REQUIRED_PARAM_STATE.get(type(optimizer).__name__, ())
    for index, entry in saved_state.items():
        where = f"optimizer_state['state'][{index!r}]"
        if index not in params:
            fail(f"{where} belongs to no parameter of optimizer_state['param_groups']")
        if not isinstance(entry, Mapping):
            fail(f"{where} should be a dict, found {_describe(entry)}")
        param = params[index]
        needed = required + (("max_exp_avg_sq",) if required and flags[index].get("amsgrad") is True else ())
        missing = [k for k in needed if entry and k not in entry]
        if missing:
            fail(f"{where} has no '{missing[0]}'")
        for key, value in entry.items():
            if not isinstance(key, str):
                fail(f"{where} has a key {key!r} that is not a string")
            if key == "step":
                if isinstance(value, torch.Tensor) and value.numel() == 1:
                    value = float(value)
                if not _is_real(value) or not math.isfinite(value) or value < 0:
                    fail(f"{where}['step'] should be a step count, found {_describe(value)}")
            elif isinstance(value, torch.Tensor):
                if tuple(value.shape) != tuple(param.shape):
                    fail(f"{where}['{key}'] has shape {shape_text(value)} "
                         f"but its parameter has shape {shape_text(param)}")
                if value.dtype == torch.bool or (value.is_complex() and not param.is_complex()):
                    fail(f"{where}['{key}'] has dtype {str(value.dtype).replace('torch.', '')}, "
                         f"its parameter {str(param.dtype).replace('torch.', '')}")
            elif value is not None and not _is_real(value) and not isinstance(value, (bool, str)):
                fail(f"{where}['{key}'] is {_describe(value)}")


def _check_hyper_parameters(group: Mapping, optimizer: torch.optim.Optimizer, where: str, fail) -> None:
    """Let the optimiser's own constructor judge the stored values (it refuses e.g. ``betas`` >= 1,
    a negative ``lr``), on a one-element stand-in parameter; ``load_state_dict`` does not check them."""
    try:
        accepted = inspect.signature(type(optimizer).__init__).parameters
    except (TypeError, ValueError):
        return
    kwargs = {k: v for k, v in group.items()
              if k in accepted and k not in ("self", "params", "foreach") + _EXECUTION_FLAGS}
    try:
        type(optimizer)([torch.zeros(1, requires_grad=True)], **kwargs)
    except (ValueError, TypeError, RuntimeError, KeyError) as exc:
        fail(f"{where} is refused by {type(optimizer).__name__}: {short_reason(exc)}")


def _check_scheduler_state(state: Any, scheduler, fail) -> None:
    if not isinstance(state, Mapping):
        fail(f"scheduler_state is {_describe(state)}, not a dict")
    current = scheduler.state_dict()
    kind = type(scheduler).__name__
    for key, value in state.items():
        if key not in current:
            # load_state_dict copies every field into the scheduler object: an unknown one
            # (e.g. 'optimizer') would replace its internals
            fail(f"scheduler_state has field {key!r}, which a {kind} scheduler does not have")
        problem = _kind_problem(value, current[key])
        if problem:
            fail(f"scheduler_state['{key}'] {problem}")
        if key in _POSITIVE_SCHEDULER_FIELDS and _is_real(current[key]) and not value > 0:
            fail(f"scheduler_state['{key}'] should be positive, found {value!r}")


def check_resume_state(ckpt: Checkpoint, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                       scheduler: Any = None) -> None:
    """Raise :class:`CheckpointError` unless ``ckpt`` can be loaded into these objects to continue a run.

    Checked before anything is loaded, so that a crafted or mismatched file is
    refused with one line naming it instead of failing inside PyTorch (or
    later, in the first training step): the model state (:func:`check_state_matches`);
    the optimiser state (a dict with ``state`` and ``param_groups``, as many
    groups and parameters as ``optimizer`` has, hyper-parameters of the right
    kind and finite, per-parameter tensors of their parameter's shape, a valid
    ``step``, the entries the optimiser needs); the scheduler state (only
    fields ``scheduler`` has, each of the right kind); and the metrics a
    resumed run reads (``ei_weight``, ``jacobian_weight``: numbers). States
    that are ``None`` in the checkpoint, or whose object is ``None``, are not checked.
    """
    name = ckpt.name

    def fail(problem: str):
        raise CheckpointError(f"{name}: cannot resume from it: {problem}")

    check_state_matches(ckpt.model_state, model, name=name)
    if optimizer is not None and ckpt.optimizer_state is not None:
        _check_optimizer_state(ckpt.optimizer_state, optimizer, fail)
    if scheduler is not None and ckpt.scheduler_state is not None:
        _check_scheduler_state(ckpt.scheduler_state, scheduler, fail)
    for key in ("ei_weight", "jacobian_weight"):
        value = (ckpt.metrics or {}).get(key)
        if value is not None and not _is_real(value):
            fail(f"metrics['{key}'] should be a number, found {_describe(value)}")
