"""A trained (or default) model ready to reconstruct, evaluate and probe for equivariance.

Scans given as images are taken as ground truth: measurements are simulated
with the model's own physics (``y = A x + n``, seeded), which is how
``equideq evaluate`` and the workbench compare the DEQ with ``A^dagger y``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from engine.checkpoint import Checkpoint, check_state_matches, load_checkpoint
from engine.config import ExperimentConfig
from engine.deq import DEQReconstructor
from engine.errors import ScanError
from engine.metrics import (default_angles, equivariance_error, operator_equivariance_error, psnr, rotate, ssim)
from engine.model import build_model, resolve_device
from engine.physics import baseline, build_physics, to_display, to_model_space

EVALUATION_CHUNK = 8


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy()


@dataclass
class LoadedModel:
    model: DEQReconstructor
    config: ExperimentConfig
    physics: object
    device: torch.device
    source: str = "default"
    checkpoint: Optional[Checkpoint] = field(default=None, repr=False)

    @property
    def modality(self) -> str:
        return self.config.physics.modality

    @property
    def size(self) -> int:
        return self.config.physics.img_size

    # -- tensors ---------------------------------------------------------------------------
    def images_to_tensor(self, images: np.ndarray) -> torch.Tensor:
        images = np.asarray(images, dtype=np.float32)
        if images.ndim == 2:
            images = images[None]
        if images.shape[-2:] != (self.size, self.size):
            raise ScanError(f"images are {images.shape[-2]}x{images.shape[-1]}, the model reconstructs "
                            f"{self.size}x{self.size}: prepare them with engine.data.prepare_slices")
        if not np.isfinite(images).all():
            raise ScanError("images contain NaN or Inf values")
        return to_model_space(torch.from_numpy(images)[:, None], self.modality).to(self.device)

    @torch.no_grad()
    def simulate(self, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
        torch.manual_seed(seed)
        return self.physics(x)

    @torch.no_grad()
    def reconstruct_measurements(self, y: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        return torch.cat([self.model(chunk, self.physics) for chunk in y.split(EVALUATION_CHUNK)])

    # -- what the CLI and the GUI ask for -----------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, images: np.ndarray, seed: int = 0) -> dict:
        """Simulate ``y`` from images in ``[0, 1]``; return display arrays (first slice) and stacks."""
        from engine.trainer import measurement_image

        x = self.images_to_tensor(images)
        y = self.simulate(x, seed)
        x_hat = self.reconstruct_measurements(y)
        x_base = baseline(self.physics, y)
        mask = getattr(self.physics, "mask", None)
        return {
            "measurement": measurement_image(y[:1], self.modality),
            "baseline": _numpy(to_display(x_base))[:, 0],
            "reconstruction": _numpy(to_display(x_hat))[:, 0],
            "reference": _numpy(to_display(x))[:, 0],
            "mask": _numpy(mask[0, 0]) if isinstance(mask, torch.Tensor) else None,
            "modality": self.modality,
            "forward_stats": self.model.last_forward_stats,
            "psnr": _numpy(psnr(x_hat, x)),
            "baseline_psnr": _numpy(psnr(x_base, x)),
        }

    @torch.no_grad()
    def equivariance(self, image: np.ndarray, angle_deg: float) -> dict:
        """``T_g f(y)``, ``f(A T_g f(y))``, their difference and relative squared error."""
        x = self.images_to_tensor(image[None] if np.ndim(image) == 2 else image)[:1]
        recon = self.reconstruct_measurements(self.physics.A(x))
        rotated = rotate(recon, angle_deg)
        of_rotated = self.reconstruct_measurements(self.physics.A(rotated))
        error = float(((of_rotated - rotated) ** 2).sum() / (rotated ** 2).sum().clamp_min(1e-20))
        return {
            "rotated_reconstruction": _numpy(to_display(rotated))[0, 0],
            "reconstruction_of_rotated": _numpy(to_display(of_rotated))[0, 0],
            "difference": _numpy(to_display(of_rotated - rotated))[0, 0],
            "error": error,
            "angle": float(angle_deg),
        }

    def equivariance_curve(self, image: np.ndarray, angles: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        errors = [self.equivariance(image, a)["error"] for a in angles]
        return np.asarray(list(angles), dtype=float), np.asarray(errors)

    @torch.no_grad()
    def evaluate(self, images: np.ndarray, angles: Optional[Sequence[float]] = None, seed: int = 0) -> dict:
        """PSNR/SSIM of the model and of ``A^dagger y`` (mean and per image) and equivariance errors."""
        x = self.images_to_tensor(images)
        y = self.simulate(x, seed)
        x_hat = self.reconstruct_measurements(y)
        x_base = baseline(self.physics, y)
        angles = list(angles) if angles is not None else list(default_angles(4, seed))
        model_psnr, model_ssim = _numpy(psnr(x_hat, x)), _numpy(ssim(x_hat, x))
        base_psnr, base_ssim = _numpy(psnr(x_base, x)), _numpy(ssim(x_base, x))
        recon = lambda meas: self.reconstruct_measurements(meas)
        return {
            "model": {"psnr": float(model_psnr.mean()), "ssim": float(model_ssim.mean()),
                      "psnr_per_image": model_psnr.tolist(), "ssim_per_image": model_ssim.tolist()},
            "baseline": {"psnr": float(base_psnr.mean()), "ssim": float(base_ssim.mean()),
                         "psnr_per_image": base_psnr.tolist(), "ssim_per_image": base_ssim.tolist(),
                         "method": "FBP" if self.modality == "ct" else "zero-filled"},
            "equivariance_error": equivariance_error(recon, self.physics, x, angles),
            "operator_equivariance_error": operator_equivariance_error(self.model, self.physics, x[:EVALUATION_CHUNK],
                                                                       angles),
            "angles": angles,
            "images": int(x.shape[0]),
            "source": self.source,
        }


def model_from_config(config: ExperimentConfig, device: Optional[str] = None) -> LoadedModel:
    """The configured DEQ with the default (shipped pretrained) denoiser weights."""
    config = config.validate()
    dev = torch.device(device) if device else resolve_device(config.run.device)
    physics = build_physics(config.physics, dev, rng=torch.Generator(device=dev).manual_seed(config.data.seed))
    physics.noise_model.rng = None
    model = build_model(config, dev).eval()
    return LoadedModel(model=model, config=config, physics=physics, device=dev)


def load_model(path: str | Path, device: Optional[str] = None) -> LoadedModel:
    """A model from a checkpoint file (safe load; mismatches raise CheckpointError)."""
    ckpt = load_checkpoint(path)
    config = ckpt.experiment_config()
    loaded = model_from_config(config, device)
    check_state_matches(ckpt.model_state, loaded.model)
    loaded.model.load_state_dict(ckpt.model_state)
    loaded.model.eval()
    loaded.source = str(path)
    loaded.checkpoint = ckpt
    return loaded
