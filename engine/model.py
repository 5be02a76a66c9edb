"""Assemble the DEQ reconstructor from a config: denoiser, fixed-point map, solvers.

Default denoiser weights: when ``model.weights`` is empty, the shipped
pretrained weights in ``resources/weights/`` are used if one matches the
architecture (see ``resources/weights/README.md`` for the command that made
them); otherwise the denoiser starts from its seeded random initialisation.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch

from engine.config import ExperimentConfig, ModelConfig
from engine.data_fidelity import resolve_fidelity
from engine.deq import DEQReconstructor, FixedPointOperator
from engine.denoisers import build_denoiser, load_denoiser_weights, set_channels_last
from engine.errors import ConfigError
from engine.events import RunControl
from engine.physics import image_channels
from engine.resources import frozen_bundle, resource_path

WEIGHTS_DIR = resource_path("weights")


def pretrained_name(model_cfg: ModelConfig, in_channels: int) -> str:
    """File name of the shipped weights for this architecture."""
    sn = "sn" if model_cfg.spectral_norm else "nosn"
    return (f"{model_cfg.denoiser}_c{model_cfg.channels}_d{model_cfg.depth}_{model_cfg.norm}_{sn}"
            f"_in{in_channels}.pt")


def default_weights(model_cfg: ModelConfig, in_channels: int) -> Optional[Path]:
    path = WEIGHTS_DIR / pretrained_name(model_cfg, in_channels)
    return path if path.is_file() else None


def resolve_device(name: str) -> torch.device:
    """``run.device`` as a torch device: ``auto`` picks CUDA when it works; ``cuda`` without it is refused."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device = 'cuda', but this machine has no working CUDA device "
                          "(torch.cuda.is_available() is False); use run.device = 'auto' or 'cpu'")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def build_model(config: ExperimentConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                control: Optional[RunControl] = None, load_weights: bool = True) -> DEQReconstructor:
    """The configured :class:`~engine.deq.DEQReconstructor` (denoiser weights loaded when available)."""
    in_channels = image_channels(config.physics)
    torch.manual_seed(config.run.seed)  # reproducible initialisation
    denoiser = build_denoiser(config.model, in_channels)
    if load_weights:
        weights = Path(config.model.weights) if config.model.weights else default_weights(config.model, in_channels)
        if weights is not None:
            load_denoiser_weights(denoiser, weights)
    fidelity = resolve_fidelity(config.deq.data_fidelity, config.physics.modality, config.deq.operator)
    operator = FixedPointOperator(denoiser, config.deq.operator, config.deq.stepsize, fidelity,
                                  relaxation=config.deq.relaxation, sigma=config.deq.sigma,
                                  learn_sigma=config.deq.learn_sigma)
    model = DEQReconstructor(
        operator,
        forward_solver=dataclasses.replace(config.solver),  # copies: the model may change its own
        backward_solver=dataclasses.replace(config.backward_solver),
        gradient=config.deq.gradient,
        unrolled_iterations=config.deq.unrolled_iterations,
        control=control,
    )
    model = model.to(device=device, dtype=dtype)
    configure_execution(model, config.run, device)
    return model


def resolve_memory_format(memory_format: str, device) -> str:
    """``run.memory_format`` for ``device``: "auto" is "channels_last" on the CPU, "contiguous" elsewhere."""
    if memory_format != "auto":
        return memory_format
    return "channels_last" if torch.device(device).type == "cpu" else "contiguous"


def configure_execution(model: DEQReconstructor, run_cfg, device) -> DEQReconstructor:
    """Apply ``run.memory_format`` / ``run.autocast`` / ``run.compile`` to the model's denoiser.

    ``memory_format = "auto"`` is channels-last on the CPU, where a training step measured 15 % faster
    than in the ordinary layout (128 px, ``benchmarks/README.md``), and the ordinary layout elsewhere
    (not measured here).
    """
    set_channels_last(model.operator.denoiser, resolve_memory_format(run_cfg.memory_format, device) == "channels_last")
    if run_cfg.compile and frozen_bundle() is not None:
        raise ConfigError("run.compile is not available in the packaged app (torch.compile's compiler is left out "
                          "of the bundle); set run.compile = false, or train from a Python install")
    model.operator.set_execution(autocast=run_cfg.autocast, compile=run_cfg.compile)
    return model
