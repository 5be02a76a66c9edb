"""A trained (or default) model ready to reconstruct, evaluate and probe for equivariance.

Scans given as images are taken as ground truth: measurements are simulated
with the model's own physics (``y = A x + n``, seeded), which is how
``equideq evaluate`` and the workbench compare the DEQ with ``A^dagger y``.

Scans of raw measurements (k-space, sinograms; :mod:`engine.data.measurements`)
are reconstructed from what was measured, with the model's physics rebuilt on
the data's own mask / angles (:meth:`LoadedModel.load_measurements`,
:meth:`LoadedModel.reconstruct_measured`, :meth:`LoadedModel.evaluate_measured`).
Without reference images their metrics are measurement-domain ones
(``domain = "measurement"``: PSNR of ``A x`` against ``y``, SSIM NaN).
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
from engine.data.measurements import Measurements, load_measurements, measurement_metrics, measurement_physics
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

    # -- measured data (k-space / sinogram files) ---------------------------------------------
    def load_measurements(self, path) -> Measurements:
        """The raw measurements in ``path``, checked against this model's physics (ScanError if they do not fit)."""
        owner = f"checkpoint {Path(self.source).name}" if self.checkpoint is not None else "the model"
        return load_measurements(path, self.config.physics, owner=owner)

    def physics_for(self, meas: Measurements):
        """This model's physics on the data's own sampling mask (MRI) / angle list (CT)."""
        physics = measurement_physics(self.config.physics, meas, self.device,
                                      rng=torch.Generator(device=self.device).manual_seed(self.config.data.seed))
        physics.noise_model.rng = None
        return physics

    def _solve_measured(self, meas: Measurements, physics, indices=None):
        y = meas.y if indices is None else meas.y[list(indices)]
        ref = meas.reference if indices is None or meas.reference is None else meas.reference[list(indices)]
        y = y.to(self.device)
        self.model.eval()
        x_hat = torch.cat([self.model(chunk, physics) for chunk in y.split(EVALUATION_CHUNK)])
        return y, None if ref is None else ref.to(self.device), x_hat, baseline(physics, y)

    @torch.no_grad()
    def reconstruct_measured(self, meas: Measurements, indices: Optional[Sequence[int]] = None) -> dict:
        """Reconstruct measured slices (all, or ``indices``); the same keys as :meth:`reconstruct`.

        ``psnr``/``baseline_psnr`` are image-domain against the reference when the data
        has one, else measurement-domain (``domain`` says which); ``residual`` is
        ``||A x - y|| / ||y||`` per slice.
        """
        from engine.trainer import measurement_image

        physics = self.physics_for(meas)
        y, ref, x_hat, x_base = self._solve_measured(meas, physics, indices)
        fit, base_fit = measurement_metrics(physics, x_hat, y), measurement_metrics(physics, x_base, y)
        mask = getattr(physics, "mask", None)
        return {
            "measurement": measurement_image(y[:1], self.modality),
            "baseline": _numpy(to_display(x_base))[:, 0],
            "reconstruction": _numpy(to_display(x_hat))[:, 0],
            "reference": None if ref is None else _numpy(to_display(ref))[:, 0],
            "mask": _numpy(mask[0, 0]) if isinstance(mask, torch.Tensor) else None,
            "modality": self.modality,
            "forward_stats": self.model.last_forward_stats,
            "domain": "image" if ref is not None else "measurement",
            "psnr": _numpy(psnr(x_hat, ref)) if ref is not None else _numpy(fit[0]),
            "baseline_psnr": _numpy(psnr(x_base, ref)) if ref is not None else _numpy(base_fit[0]),
            "residual": _numpy(fit[1]),
            "baseline_residual": _numpy(base_fit[1]),
        }

    @torch.no_grad()
    def evaluate_measured(self, meas: Measurements, angles: Optional[Sequence[float]] = None, seed: int = 0) -> dict:
        """:meth:`evaluate` for measured data: the same keys, plus ``domain`` and ``residual``.

        With reference images, PSNR/SSIM are image-domain. Without, ``psnr`` is the
        PSNR of ``A x`` against the measured ``y``, ``ssim`` is NaN, and the
        equivariance errors are probed on the model's own reconstructions.
        """
        physics = self.physics_for(meas)
        y, ref, x_hat, x_base = self._solve_measured(meas, physics)
        angles = list(angles) if angles is not None else list(default_angles(4, seed))
        fit, base_fit = measurement_metrics(physics, x_hat, y), measurement_metrics(physics, x_base, y)
        if ref is not None:
            domain = "image"
            model_psnr, model_ssim = _numpy(psnr(x_hat, ref)), _numpy(ssim(x_hat, ref))
            base_psnr, base_ssim = _numpy(psnr(x_base, ref)), _numpy(ssim(x_base, ref))
        else:
            domain = "measurement"
            model_psnr, base_psnr = _numpy(fit[0]), _numpy(base_fit[0])
            model_ssim = base_ssim = np.full(len(model_psnr), np.nan)
        probe = ref if ref is not None else x_hat
        recon = lambda meas_y: torch.cat([self.model(c, physics) for c in meas_y.split(EVALUATION_CHUNK)])
        return {
            "domain": domain,
            "model": {"psnr": float(model_psnr.mean()), "ssim": float(model_ssim.mean()),
                      "psnr_per_image": model_psnr.tolist(), "ssim_per_image": model_ssim.tolist(),
                      "residual": float(_numpy(fit[1]).mean())},
            "baseline": {"psnr": float(base_psnr.mean()), "ssim": float(base_ssim.mean()),
                         "psnr_per_image": base_psnr.tolist(), "ssim_per_image": base_ssim.tolist(),
                         "residual": float(_numpy(base_fit[1]).mean()),
                         "method": "FBP" if self.modality == "ct" else "zero-filled"},
            "equivariance_error": equivariance_error(recon, physics, probe, angles),
            "operator_equivariance_error": operator_equivariance_error(self.model, physics,
                                                                       probe[:EVALUATION_CHUNK], angles),
            "angles": angles,
            "images": int(y.shape[0]),
            "source": self.source,
            "data": meas.source,
            "reference": meas.reference_kind,
            "notes": list(dict.fromkeys(meas.notes)),
        }

    def equivariance_curve(self, image: np.ndarray, angles: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        errors = [self.equivariance(image, a)["error"] for a in angles]
        return np.asarray(list(angles), dtype=float), np.asarray(errors)

    @torch.no_grad()
    def evaluate(self, images: np.ndarray, angles: Optional[Sequence[float]] = None, seed: int = 0,
                 equivariance_images: Optional[int] = None) -> dict:
        """PSNR/SSIM of the model and of ``A^dagger y`` (mean and per image) and equivariance errors.

        The equivariance errors cost a reconstruction per angle; ``equivariance_images``
        limits them to the first images (default: all).
        """
        x = self.images_to_tensor(images)
        y = self.simulate(x, seed)
        x_hat = self.reconstruct_measurements(y)
        x_base = baseline(self.physics, y)
        angles = list(angles) if angles is not None else list(default_angles(4, seed))
        model_psnr, model_ssim = _numpy(psnr(x_hat, x)), _numpy(ssim(x_hat, x))
        base_psnr, base_ssim = _numpy(psnr(x_base, x)), _numpy(ssim(x_base, x))
        recon = lambda meas: self.reconstruct_measurements(meas)
        return {
            "domain": "image",
            "model": {"psnr": float(model_psnr.mean()), "ssim": float(model_ssim.mean()),
                      "psnr_per_image": model_psnr.tolist(), "ssim_per_image": model_ssim.tolist()},
            "baseline": {"psnr": float(base_psnr.mean()), "ssim": float(base_ssim.mean()),
                         "psnr_per_image": base_psnr.tolist(), "ssim_per_image": base_ssim.tolist(),
                         "method": "FBP" if self.modality == "ct" else "zero-filled"},
            "equivariance_error": equivariance_error(recon, self.physics, x[:equivariance_images], angles),
            "operator_equivariance_error": operator_equivariance_error(self.model, self.physics, x[:EVALUATION_CHUNK],
                                                                       angles),
            "angles": angles,
            "images": int(x.shape[0]),
            "source": self.source,
        }


def model_from_config(config: ExperimentConfig, device: Optional[str] = None, *,
                      load_weights: bool = True) -> LoadedModel:
    """The configured DEQ with the default (shipped pretrained) denoiser weights.

    ``load_weights=False``: no weights file is read (``model.weights`` nor the
    shipped one), for a caller that loads a checkpoint's state next.
    """
    config = config.validate()
    dev = torch.device(device) if device else resolve_device(config.run.device)
    physics = build_physics(config.physics, dev, rng=torch.Generator(device=dev).manual_seed(config.data.seed))
    physics.noise_model.rng = None
    model = build_model(config, dev, load_weights=load_weights).eval()
    return LoadedModel(model=model, config=config, physics=physics, device=dev)


def load_model(path: str | Path, device: Optional[str] = None) -> LoadedModel:
    """A model from a checkpoint file (safe load; mismatches raise CheckpointError)."""
    ckpt = load_checkpoint(path)
    config = ckpt.experiment_config()
    if device is None and config.run.device == "cuda" and not torch.cuda.is_available():
        device = "cpu"  # trained on a GPU, used on a machine without one: the weights run anywhere
    # the checkpoint holds every weight: never read model.weights (it may have moved since)
    loaded = model_from_config(config, device, load_weights=False)
    check_state_matches(ckpt.model_state, loaded.model, name=ckpt.name)
    loaded.model.load_state_dict(ckpt.model_state)
    loaded.model.eval()
    loaded.source = str(path)
    loaded.checkpoint = ckpt
    return loaded
