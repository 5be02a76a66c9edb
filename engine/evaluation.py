"""One evaluation path, shared by the trainer's validation, ``equideq evaluate`` / ``reconstruct``,
the workbench and the benchmarks.

A :class:`Problem` is a stack of measurements ``y`` with the physics that made
them and, when known, the reference images ``x``:

* simulated from images (``y = A x + n``, seeded): the reference is ``x``;
* measured (k-space / sinogram files): the reference is whatever the file
  holds, often nothing.

Every method is scored the same way (:func:`score`). With a reference the
metrics are image-domain (PSNR and SSIM against ``x``); without one they are
measurement-domain: PSNR of ``A x_hat`` against ``y`` over the measured
entries (data consistency, not image quality) and SSIM NaN. The relative
residual ``||A x_hat - y|| / ||y||`` is always reported.

Results are dataclasses: :class:`Scores` (one method, per image),
:class:`Reconstruction` (display arrays and scores of one stack),
:class:`EquivarianceProbe` (one rotation) and :class:`Evaluation` (model vs
baseline plus equivariance errors; :meth:`Evaluation.to_dict` is the JSON
that ``equideq evaluate --json`` prints).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from engine.measured import measurement_metrics
from engine.metrics import equivariance_error, operator_equivariance_error, psnr, rotate, ssim
from engine.physics import baseline, to_display

EVALUATION_CHUNK = 8  # samples per model call: bounds memory on long stacks


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy()


def measurement_image(y: torch.Tensor, modality: str) -> np.ndarray:
    """A 2D display array of one measurement: the sinogram, or k-space log-magnitude."""
    if modality == "ct":
        return y[0, 0].detach().float().cpu().numpy()
    magnitude = torch.sqrt(y[0, 0] ** 2 + y[0, 1] ** 2)
    return torch.log1p(magnitude / magnitude.max().clamp_min(1e-12) * 1e3).float().cpu().numpy()


def baseline_method(modality: str) -> str:
    """The name of ``A^dagger y`` for a modality, as tables print it."""
    return "FBP" if modality == "ct" else "zero-filled"


@dataclass(frozen=True)
class Problem:
    """Measurements ``y`` ``[N, C, H, W]``, their physics and (optionally) reference images ``[N, 1, H, W]``."""

    y: torch.Tensor
    physics: Any
    modality: str
    reference: Optional[torch.Tensor] = None

    @property
    def domain(self) -> str:
        """``"image"`` when references exist, else ``"measurement"``."""
        return "image" if self.reference is not None else "measurement"

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, indices: Sequence[int]) -> "Problem":
        index = list(indices)
        return Problem(self.y[index], self.physics, self.modality,
                       None if self.reference is None else self.reference[index])


@dataclass
class Scores:
    """One method's per-image metrics on a problem (see the module docstring for the domains)."""

    psnr: np.ndarray
    ssim: np.ndarray
    residual: np.ndarray

    def summary(self) -> dict:
        """Means and per-image lists, as ``equideq evaluate --json`` reports them."""
        return {"psnr": float(self.psnr.mean()), "ssim": float(self.ssim.mean()),
                "psnr_per_image": self.psnr.tolist(), "ssim_per_image": self.ssim.tolist(),
                "residual": float(self.residual.mean())}


@torch.no_grad()
def solve(model, problem: Problem, chunk: Optional[int] = EVALUATION_CHUNK) -> torch.Tensor:
    """``x_hat = f(y)`` for the whole stack, ``chunk`` samples per call (``None``: one call)."""
    model.eval()
    if chunk is None:
        return model(problem.y, problem.physics)
    return torch.cat([model(part, problem.physics) for part in problem.y.split(chunk)])


@torch.no_grad()
def score(problem: Problem, x: torch.Tensor, with_ssim: bool = True) -> Scores:
    """Per-image metrics of ``x`` on ``problem`` (image-domain with a reference, else measurement-domain)."""
    fit_psnr, residual = measurement_metrics(problem.physics, x, problem.y)
    if problem.reference is not None:
        values = _numpy(psnr(x, problem.reference))
        similarity = _numpy(ssim(x, problem.reference)) if with_ssim else np.full(len(values), np.nan)
    else:
        values, similarity = _numpy(fit_psnr), np.full(len(problem), np.nan)
    return Scores(psnr=values, ssim=similarity, residual=_numpy(residual))


@dataclass
class Reconstruction:
    """A reconstructed stack: display arrays ``[N, H, W]`` in ``[0, 1]`` and per-image scores.

    ``measurement`` is the first sample's sinogram / k-space log-magnitude (2D);
    ``mask`` the MRI sampling mask (2D) or None; ``reference`` None without one.
    """

    measurement: np.ndarray
    baseline: np.ndarray
    reconstruction: np.ndarray
    reference: Optional[np.ndarray]
    mask: Optional[np.ndarray]
    modality: str
    domain: str
    psnr: np.ndarray
    baseline_psnr: np.ndarray
    residual: np.ndarray
    baseline_residual: np.ndarray
    forward_stats: Any = None  # the last solve's SolveStats


def reconstruction_of(problem: Problem, x_hat: torch.Tensor, x_base: torch.Tensor, *,
                      first_only: bool = False, forward_stats: Any = None) -> Reconstruction:
    """Display arrays and scores of solved images (``first_only``: display the first sample only)."""
    shown = slice(0, 1) if first_only else slice(None)
    model_scores, base_scores = score(problem, x_hat, with_ssim=False), score(problem, x_base, with_ssim=False)
    mask = getattr(problem.physics, "mask", None)
    return Reconstruction(
        measurement=measurement_image(problem.y[:1], problem.modality),
        baseline=_numpy(to_display(x_base[shown]))[:, 0],
        reconstruction=_numpy(to_display(x_hat[shown]))[:, 0],
        reference=None if problem.reference is None else _numpy(to_display(problem.reference[shown]))[:, 0],
        mask=_numpy(mask[0, 0]) if isinstance(mask, torch.Tensor) else None,
        modality=problem.modality, domain=problem.domain,
        psnr=model_scores.psnr, baseline_psnr=base_scores.psnr,
        residual=model_scores.residual, baseline_residual=base_scores.residual,
        forward_stats=forward_stats)


@torch.no_grad()
def reconstruct(model, problem: Problem) -> Reconstruction:
    """Solve every sample of ``problem`` and return display arrays and scores."""
    x_hat = solve(model, problem)
    return reconstruction_of(problem, x_hat, baseline(problem.physics, problem.y),
                             forward_stats=getattr(model, "last_forward_stats", None))


@dataclass
class EquivarianceProbe:
    """``T_g f(A x)`` against ``f(A T_g f(A x))`` for one rotation ``g`` (display arrays, 2D)."""

    rotated_reconstruction: np.ndarray
    reconstruction_of_rotated: np.ndarray
    difference: np.ndarray
    error: float  # ||f(A T_g x_hat) - T_g x_hat||^2 / ||T_g x_hat||^2
    angle: float


@torch.no_grad()
def equivariance_probe(model, physics, image: torch.Tensor, angle_deg: float) -> EquivarianceProbe:
    """Rotate the reconstruction of ``A image`` and reconstruct the rotation's measurements."""
    recon = solve(model, Problem(physics.A(image), physics, ""))
    rotated = rotate(recon, angle_deg)
    of_rotated = solve(model, Problem(physics.A(rotated), physics, ""))
    error = float(((of_rotated - rotated) ** 2).sum() / (rotated ** 2).sum().clamp_min(1e-20))
    return EquivarianceProbe(rotated_reconstruction=_numpy(to_display(rotated))[0, 0],
                             reconstruction_of_rotated=_numpy(to_display(of_rotated))[0, 0],
                             difference=_numpy(to_display(of_rotated - rotated))[0, 0],
                             error=error, angle=float(angle_deg))


@dataclass
class Evaluation:
    """The model against ``A^dagger y`` on a problem, and how equivariant the model is."""

    domain: str
    model: Scores
    baseline: Scores
    baseline_method: str
    equivariance_error: float  # reconstructor: f(A T_g x) vs T_g f(A x)
    operator_equivariance_error: float  # fixed-point map at its fixed point
    angles: list
    images: int
    source: str = ""
    data: Optional[str] = None  # measured data: where it came from
    reference: Optional[str] = None  # measured data: what the reference images are, if any
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """The JSON of ``equideq evaluate --json`` (keys kept stable for scripts)."""
        out = {"domain": self.domain, "model": self.model.summary(),
               "baseline": {**self.baseline.summary(), "method": self.baseline_method},
               "equivariance_error": self.equivariance_error,
               "operator_equivariance_error": self.operator_equivariance_error,
               "angles": list(self.angles), "images": self.images, "source": self.source}
        if self.data is not None:
            out.update(data=self.data, reference=self.reference, notes=list(self.notes))
        return out


@torch.no_grad()
def evaluate(model, problem: Problem, angles: Sequence[float], *, equivariance_images: Optional[int] = None,
             source: str = "", data: Optional[str] = None, reference: Optional[str] = None,
             notes: Sequence[str] = ()) -> Evaluation:
    """PSNR/SSIM of the model and of ``A^dagger y`` (per image) and the equivariance errors.

    The errors are probed on the reference images, or on the model's own
    reconstructions without them; each angle costs a reconstruction, so
    ``equivariance_images`` limits the reconstructor's error to the first images.
    """
    x_hat = solve(model, problem)
    x_base = baseline(problem.physics, problem.y)
    probe = problem.reference if problem.reference is not None else x_hat
    recon: Callable[[torch.Tensor], torch.Tensor] = lambda y: solve(model, Problem(y, problem.physics, ""))
    angles = list(angles)
    return Evaluation(
        domain=problem.domain, model=score(problem, x_hat), baseline=score(problem, x_base),
        baseline_method=baseline_method(problem.modality),
        equivariance_error=equivariance_error(recon, problem.physics, probe[:equivariance_images], angles),
        operator_equivariance_error=operator_equivariance_error(model, problem.physics, probe[:EVALUATION_CHUNK],
                                                                angles),
        angles=angles, images=len(problem), source=source, data=data, reference=reference,
        notes=list(dict.fromkeys(notes)))
