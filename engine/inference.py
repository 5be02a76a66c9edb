"""A trained (or default) model ready to reconstruct, evaluate and probe for equivariance.

Scans given as images are taken as ground truth: measurements are simulated
with the model's own physics (``y = A x + n``, seeded), which is how
``equideq evaluate`` and the workbench compare the DEQ with ``A^dagger y``.

Scans of raw measurements (k-space, sinograms; :mod:`engine.measured`)
are reconstructed from what was measured, with the model's physics rebuilt on
the data's own mask / angles (:meth:`LoadedModel.load_measurements`,
:meth:`LoadedModel.problem`). Without reference images their metrics are
measurement-domain ones (``domain = "measurement"``: PSNR of ``A x`` against
``y``, SSIM NaN). Reconstruction and evaluation themselves are
:mod:`engine.evaluation`'s, the one path every caller shares.

Other sizes: the denoiser is convolutional and applies at any resolution, so
:meth:`LoadedModel.at_size` gives the same network with the operator built
for another image size (a scan's own, say). Raw measurements fix their size
(:func:`engine.measured.measured_image_size` says which, and why another is
refused).

Modality: :func:`check_modality` says whether an image scan's modality (from
its file) is the model's, unknown, or a different one -- simulating a CT
sinogram of an MR image is no reconstruction of anything, so callers refuse
that unless asked, and say so when the file does not tell.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from engine.checkpoint import Checkpoint, check_state_matches, load_checkpoint
from engine.config import ExperimentConfig
from engine.deq import DEQReconstructor
from engine.data.measurements import Measurements
from engine.measured import load_measurements, measurement_physics
from engine.errors import ScanError
from engine.evaluation import (EquivarianceProbe, Evaluation, Problem, Reconstruction, equivariance_probe, evaluate,
                               reconstruct, solve)
from engine.metrics import default_angles
from engine.model import build_model, resolve_device
from engine.physics import build_physics, to_model_space


@dataclass
class LoadedModel:
    model: DEQReconstructor
    config: ExperimentConfig
    physics: object
    device: torch.device
    source: str = "default"
    checkpoint: Optional[Checkpoint] = field(default=None, repr=False)
    #: this model at every size asked for (:meth:`at_size`), shared by all of them
    _by_size: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def modality(self) -> str:
        return self.config.physics.modality

    @property
    def size(self) -> int:
        return self.config.physics.img_size

    def at_size(self, size: int) -> "LoadedModel":
        """This model reconstructing ``size x size`` images: the same network, the operator built for that size.

        The network (and its weights) is shared, not copied: a weight change
        shows at every size. The physics is the config's at ``physics.img_size =
        size`` (CT: the same views over a finer or coarser grid; MRI: the mask
        drawn for that size with the same acceleration, centre and seed), built
        once per size and kept (a 512x512 / 60-view CT operator takes ~0.8 GB).
        Sizes outside 8..1024 are refused (ConfigError naming physics.img_size).
        """
        size = int(size)
        if size == self.size:
            return self
        self._by_size.setdefault(self.size, self)
        if size not in self._by_size:
            config = self.config.replace(**{"physics.img_size": size})
            self._by_size[size] = replace(self, config=config, physics=_model_physics(config, self.device))
        return self._by_size[size]

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
        return solve(self.model, Problem(y, self.physics, self.modality))

    # -- problems: what to reconstruct -----------------------------------------------------------
    def problem(self, source: np.ndarray | Measurements, seed: int = 0,
                indices: Optional[Sequence[int]] = None) -> Problem:
        """The problem that ``source`` poses to this model.

        Images in ``[0, 1]`` are taken as ground truth: ``y`` is simulated with the
        model's own physics (seeded). Measurements are reconstructed from what was
        measured, with the physics rebuilt on their own mask / angles; their
        reference images, when the file has them, become the reference.
        ``indices`` picks samples of measured data.
        """
        if isinstance(source, Measurements):
            y, ref = source.y, source.reference
            if indices is not None:
                y, ref = y[list(indices)], None if ref is None else ref[list(indices)]
            return Problem(y.to(self.device), self.physics_for(source), self.modality,
                           None if ref is None else ref.to(self.device))
        x = self.images_to_tensor(source)
        problem = Problem(self.simulate(x, seed), self.physics, self.modality, x)
        return problem if indices is None else problem.subset(indices)

    # -- what the CLI and the GUI ask for -----------------------------------------------------
    def reconstruct(self, source: np.ndarray | Measurements, seed: int = 0,
                    indices: Optional[Sequence[int]] = None) -> Reconstruction:
        """Reconstruct images (``y`` simulated) or measured data; display arrays and per-image scores."""
        return reconstruct(self.model, self.problem(source, seed, indices))

    def evaluate(self, source: np.ndarray | Measurements, angles: Optional[Sequence[float]] = None, seed: int = 0,
                 equivariance_images: Optional[int] = None) -> Evaluation:
        """PSNR/SSIM of the model and of ``A^dagger y`` and the equivariance errors (:func:`engine.evaluation.evaluate`).

        The equivariance errors cost a reconstruction per angle; ``equivariance_images``
        limits them to the first images (default: all).
        """
        angles = list(angles) if angles is not None else list(default_angles(4, seed))
        extra = {}
        if isinstance(source, Measurements):
            extra = dict(data=source.source, reference=source.reference_kind, notes=source.notes)
        return evaluate(self.model, self.problem(source, seed), angles, equivariance_images=equivariance_images,
                        source=self.source, **extra)

    def equivariance(self, image: np.ndarray, angle_deg: float) -> EquivarianceProbe:
        """``T_g f(y)``, ``f(A T_g f(y))``, their difference and relative squared error."""
        x = self.images_to_tensor(image[None] if np.ndim(image) == 2 else image)[:1]
        return equivariance_probe(self.model, self.physics, x, angle_deg)

    def equivariance_curve(self, image: np.ndarray, angles: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        errors = [self.equivariance(image, a).error for a in angles]
        return np.asarray(list(angles), dtype=float), np.asarray(errors)

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


def model_from_config(config: ExperimentConfig, device: Optional[str] = None, *,
                      load_weights: bool = True) -> LoadedModel:
    """The configured DEQ with the default (shipped pretrained) denoiser weights.

    ``load_weights=False``: no weights file is read (``model.weights`` nor the
    shipped one), for a caller that loads a checkpoint's state next.
    """
    config = config.validate()
    dev = torch.device(device) if device else resolve_device(config.run.device)
    physics = _model_physics(config, dev)
    model = build_model(config, dev, load_weights=load_weights).eval()
    return LoadedModel(model=model, config=config, physics=physics, device=dev)


def _model_physics(config: ExperimentConfig, device: torch.device):
    """The config's physics as a LoadedModel uses it: noise drawn from the global generator (seeded per call)."""
    physics = build_physics(config.physics, device, rng=torch.Generator(device=device).manual_seed(config.data.seed))
    physics.noise_model.rng = None
    return physics


# -- modality -------------------------------------------------------------------------------------

_MODALITY_NAMES = {"ct": "CT", "mri": "MR"}


@dataclass(frozen=True)
class ModalityCheck:
    """How an image scan's modality relates to a model's.

    ``relation``: ``"same"``; ``"unknown"`` (the file does not say: its slices
    are taken as images of the model's modality); ``"different"`` (an MR image
    into a CT model, ...: simulated measurements of the wrong kind of image,
    which callers refuse unless asked). ``message`` is one line for the user
    ("" when the same).
    """

    relation: str
    scan_modality: str
    model_modality: str
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.relation != "different"


def check_modality(scan, model_modality: str, owner: str = "the model") -> ModalityCheck:
    """:class:`ModalityCheck` of an image ``scan`` (a :class:`~engine.data.scans.Scan`) for a model of ``model_modality``.

    Raw measurements are not checked here: their kind fixes their modality, and
    :func:`engine.measured.measurements_from_scan` refuses the wrong one.
    """
    name = Path(str(getattr(scan, "source", "") or "scan")).name or "scan"
    scan_modality = str(getattr(scan, "modality", "unknown") or "unknown")
    model_name = _MODALITY_NAMES.get(model_modality, model_modality)
    measured = "CT sinograms" if model_modality == "ct" else "MRI k-space"
    if scan_modality == model_modality:
        return ModalityCheck("same", scan_modality, model_modality)
    if scan_modality not in _MODALITY_NAMES:
        return ModalityCheck("unknown", scan_modality, model_modality,
                             f"{name}: the file does not say its modality; its slices are taken as {model_name} "
                             f"images and {measured} are simulated from them ({owner} is {model_name})")
    scan_name = _MODALITY_NAMES[scan_modality]
    return ModalityCheck("different", scan_modality, model_modality,
                         f"{name} is {'an' if scan_name == 'MR' else 'a'} {scan_name} image but {owner} reconstructs "
                         f"{model_name}: {measured} simulated from it would not be a reconstruction of anything "
                         f"measured")


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
