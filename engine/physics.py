"""Forward operators from the config: sparse-view CT and accelerated MRI (deepinv).

* CT: parallel-beam :class:`SparseTomography` -- deepinv's
  :class:`deepinv.physics.Tomography` (its geometry, sinogram layout and
  filtered back-projection) with ``A`` and ``A^T`` applied as an exact sparse
  matrix of deepinv's own Radon transform -- with ``views`` angles over 180
  degrees, normalised so that ``||A|| = 1`` (then a PGD step ``eta = 1`` is
  non-expansive). ``A^dagger`` is filtered back-projection.
* MRI: single-coil Cartesian :class:`deepinv.physics.MRI`; complex images are
  two channels (real, imaginary). ``A^dagger`` is the zero-filled adjoint.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
import deepinv as dinv

from engine import linalg
from engine.config import PhysicsConfig
from engine.errors import ConfigError


def image_channels(cfg: PhysicsConfig) -> int:
    """Channels of the image the denoiser sees: 1 (CT magnitude) or 2 (MRI real/imag)."""
    return 1 if cfg.modality == "ct" else 2


def _noise_model(cfg: PhysicsConfig, rng: Optional[torch.Generator]):
    if cfg.noise == "none" or (cfg.noise == "gaussian" and cfg.noise_sigma == 0):
        return dinv.physics.ZeroNoise() if hasattr(dinv.physics, "ZeroNoise") else dinv.physics.GaussianNoise(0.0)
    if cfg.noise == "gaussian":
        return dinv.physics.GaussianNoise(sigma=cfg.noise_sigma, rng=rng)
    if cfg.modality != "ct":
        raise ConfigError("physics.noise = 'poisson' is only defined for CT")
    return dinv.physics.PoissonNoise(gain=cfg.poisson_gain, normalize=True, clip_positive=True, rng=rng)


def sampling_mask(cfg: PhysicsConfig, device="cpu") -> torch.Tensor:
    """The MRI sampling mask ``[1, 2, H, W]`` (deterministic for ``mask_seed``)."""
    size = cfg.img_size
    rng = torch.Generator(device=device).manual_seed(cfg.mask_seed)
    generators = {
        "random": dinv.physics.generator.RandomMaskGenerator,
        "equispaced": dinv.physics.generator.EquispacedMaskGenerator,
        "gaussian": dinv.physics.generator.GaussianMaskGenerator,
    }
    accel = cfg.acceleration
    gen = generators[cfg.mask]((2, size, size), acceleration=int(round(accel)) if cfg.mask != "gaussian" else accel,
                               center_fraction=cfg.center_fraction, rng=rng, device=device)
    return gen.step(batch_size=1)["mask"].to(device)


_CT_NORMS: dict = {}

# ---------------------------------------------------------------------------------------
# CT: deepinv's parallel-beam Radon transform as an exact sparse matrix
# ---------------------------------------------------------------------------------------
#
# deepinv's Radon (``deepinv.physics.functional.Radon``, parallel beam) zero-pads the
# ``W x W`` image to ``P x P`` (``P = W + ceil(sqrt(2) W - W)``, or masks it to the
# inscribed disc when ``circle``), samples it with ``grid_sample(bilinear,
# padding_mode="zeros", align_corners=True)`` on the rotated grids of its
# ``all_grids`` buffer (``[1, G, V * G, 2]``: ``G`` samples along each ray, ``G``
# detector cells per view, views side by side) and sums along the rays; the sinogram
# is ``[B, C, G, V]`` (detector, view). That is linear with fixed coefficients: sample
# ``(i, d)`` of view ``t`` adds ``w * x[py, px]`` for the four bilinear corners of its
# grid point. We rebuild those weights from ``all_grids`` itself (in float64, with
# grid_sample's own unnormalisation ``ix = (gx + 1) / 2 * (P - 1)`` and corner
# weights, dropping corners outside the padded image or in the zero padding /
# outside the circle mask), sum duplicates per (ray, pixel), and store the matrix
# ``M`` (rows ``d * V + t``, deepinv's sinogram order; columns ``py * W + px``) and
# its transpose as CSR (int32 indices while they fit: faster in MKL's CSR x dense).
# The only difference from deepinv's A is the order of the floating-point sums
# (float64 weights, rounded once to the dtype): in float64 the matrix equals the
# Jacobian of deepinv's radon entry by entry to ~1e-16 (tests/test_physics.py), in
# float32 A agrees to ~5e-7 relative (and A^T is closer to the exact transpose than
# deepinv's float32 autograd adjoint, ~2e-7 vs ~7e-6). ``M^T`` is the exact
# transpose. The float32 matrix comes from deepinv's float32 grids, i.e. it is
# deepinv's float32 operator. (Pushing basis images through radon would be exact
# too but costs W^2 grid_sample calls, ~30 s at 128x128.) Building is done in
# blocks of detectors to bound peak memory (see :func:`_radon_rows`) and takes
# ~0.3 s for 128x128 / 30 views (1.1M nonzeros), ~8 s for 512x512 / 60 views
# (35M nonzeros: 0.56 GB for M and M^T in float32, 2.4 GB peak with deepinv's
# own grids); matrices are cached per (angles, size, circle, grid dtype, dtype,
# device) for the process and shared between physics objects.

_CT_MATRICES: dict = {}

#: entries (4 corners x samples) generated at once while building; bounds peak memory
_BUILD_CHUNK_ENTRIES = 1 << 22


class _SparseOperator:
    """One CSR matrix ``[n_out, n_in]`` acting on the trailing dims ``in_shape`` -> ``out_shape``.

    Read-only and shared between physics objects (``copy.deepcopy`` returns it as is).
    """

    def __init__(self, matrix: torch.Tensor, in_shape: tuple, out_shape: tuple):
        self.matrix = matrix
        self.in_shape = tuple(in_shape)
        self.out_shape = tuple(out_shape)
        self.transpose: Optional["_SparseOperator"] = None

    def __deepcopy__(self, memo):
        return self

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[: x.dim() - len(self.in_shape)]
        flat = x.reshape(-1, self.matrix.shape[1])
        if flat.shape[0] == 0:
            return x.new_zeros(*lead, *self.out_shape)
        out = torch.sparse.mm(self.matrix, flat.t())  # [n_out, batch]
        return out.t().reshape(*lead, *self.out_shape)


class _SparseMatmul(torch.autograd.Function):
    """``y = M x`` with ``dx = M^T dy`` (and forward-mode ``dy = M dx``), differentiable to any order.

    ``torch.sparse.mm`` under autograd differentiates through the sparse product
    slowly; the transpose is precomputed instead. ``setup_context`` / ``jvp`` make it
    usable inside ``torch.func.vjp`` / ``torch.func.jvp``.
    """

    @staticmethod
    def forward(x, op):
        return op.apply(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.op = inputs[1]

    @staticmethod
    def backward(ctx, grad_output):
        return _SparseMatmul.apply(grad_output, ctx.op.transpose), None

    @staticmethod
    def jvp(ctx, x_tangent, _op_tangent):
        return _SparseMatmul.apply(x_tangent, ctx.op)


def _index_dtype(*sizes: int) -> torch.dtype:
    return torch.int32 if max(sizes) < 2 ** 31 - 1 else torch.int64


def _ray_grids(radon, img_width: int, circle: bool) -> torch.Tensor:
    """deepinv's ray grids ``[samples, views * detectors, 2]`` (its ``all_grids``), rebuilt if released.

    :meth:`SparseTomography.release_radon_grids` drops deepinv's copy once the
    matrices are built; another dtype or device rebuilds them with deepinv's own
    ``_create_grids`` (the same float computation, so the same values).
    """
    grids = radon.all_grids.detach()
    if grids.numel() == 0:
        views = radon._create_grids(radon.theta, img_width, circle, device=radon.theta.device)  # [V, 1, G, G, 2]
        grids = torch.cat(list(views[:, 0].unbind(0)), dim=1)[None]
        del views
    if grids.dim() != 4 or grids.shape[0] != 1:
        raise ValueError("SparseTomography needs deepinv's parallel_computation grids [1, G, V*G, 2]")
    return grids[0]


def _radon_rows(radon, img_width: int, circle: bool, dtype: torch.dtype):
    """Deepinv's Radon matrix on the CPU as ``(entries per row, cols, values, (detectors, views))``.

    Rows in order, columns sorted within each row; weights computed in float64,
    duplicates summed (corner by corner, each in the order of the samples along
    the ray), then rounded to ``dtype``; int32 columns while they fit. Built a block of rays at a time:
    each ray's ``4 x samples`` corner entries form one row of a ``[rays, 4 *
    samples]`` block, sorted row by row (a batched sort, ~4x faster than one
    sort of every key), with corners that fall outside the image, in the zero
    padding or outside the circle mask, or that have zero weight, given the
    column ``n_in`` so that they sort last and are dropped.
    """
    from deepinv.physics.functional.radon import SQRT2

    grids = _ray_grids(radon, img_width, circle)  # [G (along ray), V*G (view, detector), 2], the grid dtype
    n_views = int(radon.theta.numel())
    samples = grids.shape[0]
    detectors = grids.shape[1] // n_views
    width = int(img_width)
    if circle:
        padded, pad_before = width, 0
        # deepinv's mask, computed the same way (float32 coordinates)
        yax = 2 * torch.arange(width, dtype=torch.float)[None, :].expand(width, -1) / (width - 1) - 1.0
        xax = yax.transpose(-2, -1)
        keep = (xax ** 2 + yax ** 2 <= 1).reshape(-1)
    else:
        pad = int((SQRT2 * width - width).ceil())
        padded, pad_before = width + pad, (width + pad) // 2 - width // 2
        keep = None
    n_in = width * width
    col_dtype = _index_dtype(n_in + 1)

    chunk = max(1, _BUILD_CHUNK_ENTRIES // (samples * n_views * 4))  # detectors per block
    by_view = grids.reshape(samples, n_views, detectors, 2)
    counts_out, cols_out, vals_out = [], [], []
    for d0 in range(0, detectors, chunk):
        d1 = min(detectors, d0 + chunk)
        # the block's rays in row order (detector, view): [detectors, views, samples]
        g = by_view[:, :, d0:d1].permute(2, 1, 0, 3)
        # grid_sample, align_corners=True: source index = (coord + 1) / 2 * (size - 1); bilinear corners
        ix = torch.empty(g.shape[:3], dtype=torch.float64).copy_(g[..., 0]).add_(1).div_(2).mul_(padded - 1)
        iy = torch.empty(g.shape[:3], dtype=torch.float64).copy_(g[..., 1]).add_(1).div_(2).mul_(padded - 1)
        ix, iy = ix.reshape(-1, samples), iy.reshape(-1, samples)  # [rays, samples]
        x0, y0 = ix.floor(), iy.floor()
        wx = ((x0 + 1).sub_(ix), ix.sub_(x0))  # weights of the corners x0 and x0 + 1, as grid_sample has them
        wy = ((y0 + 1).sub_(iy), iy.sub_(y0))
        px0 = x0.to(col_dtype).sub_(pad_before)
        py0 = y0.to(col_dtype).sub_(pad_before)
        del x0, y0
        # a corner is kept when inside the image on both axes with a non-zero weight on both (a product of
        # two non-zero weights >= ~1e-13 cannot underflow): decided per axis, then combined per corner
        kept_x = [(px0 >= -d) & (px0 < width - d) & (wx[d] != 0) for d in (0, 1)]
        kept_y = [(py0 >= -d) & (py0 < width - d) & (wy[d] != 0) for d in (0, 1)]
        first_col = py0.mul_(width).add_(px0)  # column of the corner (x0, y0), wherever it is
        del px0, py0
        rays = first_col.shape[0]
        cols = torch.empty(4, rays, samples, dtype=col_dtype)
        vals = torch.empty(4, rays, samples, dtype=torch.float64)
        for corner, (dx, dy) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1))):
            torch.mul(wx[dx], wy[dy], out=vals[corner])
            col = torch.add(first_col, dy * width + dx, out=cols[corner])
            kept = kept_x[dx] & kept_y[dy]
            if keep is not None:
                kept &= keep[col.clamp(0, n_in - 1).long()]
            col.masked_fill_(~kept, n_in)
        del first_col, wx, wy, ix, iy, kept_x, kept_y, col, kept
        # a ray's entries corner by corner, each in sample order: the order their duplicates are summed in
        cols, order = torch.sort(cols.permute(1, 0, 2).reshape(rays, -1), dim=1, stable=True)
        vals = torch.gather(vals.permute(1, 0, 2).reshape(rays, -1), 1, order)
        del order
        # runs of equal columns within a ray are one matrix entry (the dropped corners, column n_in, one
        # more run at the end of the ray): sum each run
        starts = torch.ones_like(cols, dtype=torch.bool)
        torch.ne(cols[:, 1:], cols[:, :-1], out=starts[:, 1:])
        run = torch.cumsum(starts.reshape(-1), 0, dtype=torch.int32).sub_(1)
        summed = torch.zeros(int(run[-1]) + 1, dtype=torch.float64).index_add_(0, run, vals.reshape(-1))
        del run, vals
        run_cols = cols[starts]
        kept = run_cols != n_in
        run_rays = torch.arange(rays).repeat_interleave(starts.sum(dim=1))
        counts_out.append(torch.bincount(run_rays[kept], minlength=rays))
        cols_out.append(run_cols[kept])
        vals_out.append(summed[kept].to(dtype))
        del cols, starts, summed, run_cols, kept, run_rays
    counts = torch.cat(counts_out)
    del counts_out
    return counts, torch.cat(cols_out), torch.cat(vals_out), (detectors, n_views)


def _transpose(crow_counts: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, n_cols: int):
    """``(entries per row, cols, values)`` of the transpose of a row-sorted sparse matrix (rows sorted per column).

    One stable sort of the column indices: entries of a column keep their row order.
    """
    order = torch.sort(cols, stable=True).indices
    rows = torch.repeat_interleave(torch.arange(crow_counts.numel(), dtype=_index_dtype(crow_counts.numel())),
                                   crow_counts)[order]
    return torch.bincount(cols, minlength=n_cols), rows, vals[order]


def _csr(crow_counts, cols, vals, shape, device):
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(crow_counts, 0)
    index_dtype = _index_dtype(shape[0], shape[1], cols.numel())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")  # "CSR support is in beta state"
        return torch.sparse_csr_tensor(crow.to(index_dtype), cols.to(index_dtype), vals, size=shape).to(device)


def radon_matrices(radon, img_width: int, circle: bool, dtype: torch.dtype, device,
                   release_grids: bool = False) -> tuple:
    """Deepinv's (unnormalised) Radon ``M`` and ``M^T`` as :class:`_SparseOperator` in ``dtype`` on ``device`` (cached).

    ``release_grids`` then drops deepinv's ray grids from ``radon`` (``V x G x G x 2``
    floats, 250 MB at 512x512 / 60 views) as soon as ``M`` is built, before its
    transpose: nothing needs them afterwards (another dtype or device rebuilds
    them, see :func:`_ray_grids`), and deepinv's own ``radon(x)`` is no longer usable.
    """
    device = torch.device(device)
    angles = tuple(float(a) for a in radon.theta.detach().cpu().double().reshape(-1))
    key = (angles, int(img_width), bool(circle), str(radon.all_grids.dtype), str(dtype), str(device))
    if key not in _CT_MATRICES:
        counts, cols, vals, (detectors, n_views) = _radon_rows(radon, img_width, circle, dtype)
        if release_grids:
            release_ray_grids(radon)
        n_out, n_in = detectors * n_views, int(img_width) ** 2
        matrix = _csr(counts, cols, vals, (n_out, n_in), device)
        counts_t, rows_t, vals_t = _transpose(counts, cols, vals, n_in)
        del cols, vals
        matrix_t = _csr(counts_t, rows_t, vals_t, (n_in, n_out), device)
        del rows_t, vals_t
        forward = _SparseOperator(matrix, (img_width, img_width), (detectors, n_views))
        adjoint = _SparseOperator(matrix_t, (detectors, n_views), (img_width, img_width))
        forward.transpose, adjoint.transpose = adjoint, forward
        _CT_MATRICES[key] = (forward, adjoint)
    if release_grids:
        release_ray_grids(radon)
    return _CT_MATRICES[key]


def release_ray_grids(radon) -> None:
    """Replace deepinv's ray grids in ``radon`` by an empty tensor of their dtype and device."""
    if radon.all_grids.numel():
        radon.all_grids = radon.all_grids.new_empty(0)


class SparseTomography(dinv.physics.Tomography):
    r"""Parallel-beam :class:`deepinv.physics.Tomography` whose ``A`` / ``A^T`` are one exact sparse matrix.

    Geometry, sizes, the sinogram layout ``[B, C, detectors, views]``, filtered
    back-projection (``A_dagger(y, fbp=True)``), noise (``physics(x)``) and every
    other method are deepinv's. ``A`` is deepinv's Radon transform extracted as a
    CSR matrix ``M`` (see :func:`radon_matrices`; equal to deepinv's ``radon(x)``
    up to float round-off), ``A_adjoint`` its exact transpose, both divided by
    ``operator_norm`` when ``normalize``. Autograd through either is exact (a custom
    ``autograd.Function`` whose backward is the other matrix), and about 10-20x
    faster than ``grid_sample`` and its autograd adjoint on CPU.

    ``normalize=True`` divides by this module's own ``||M||_2`` (power iteration,
    50 steps from a seeded start -- above 256x256 until settled, see
    :func:`engine.linalg.normalisation_rtol` --, cached per geometry, dtype and device) kept in the
    ``operator_norm`` buffer, which may be overwritten afterwards. Inputs may have
    any leading dims ``[..., W, W]``; matrices follow the input's dtype and device.
    """

    def __init__(self, angles, img_width: int, circle: bool = False, normalize: bool = True,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, **kwargs):
        if kwargs.get("fan_beam", False) or not kwargs.get("parallel_computation", True):
            raise ValueError("SparseTomography is parallel-beam with parallel_computation=True only")
        super().__init__(angles=angles, img_width=img_width, circle=circle, normalize=False,
                         adjoint_via_backprop=True, device=device, dtype=dtype, **kwargs)
        self.circle = bool(circle)
        self._sparse_ops = {}
        self._operators(torch.empty(0, dtype=dtype, device=device))  # build (or fetch) now, not at the first call
        if normalize:
            angle_key = tuple(float(a) for a in self.angles.detach().cpu().double().reshape(-1))
            key = (angle_key, int(img_width), self.circle, str(dtype), str(torch.device(device)))
            if key not in _CT_NORMS:
                _CT_NORMS[key] = operator_norm(self, (1, 1, img_width, img_width), device=device, dtype=dtype,
                                               iters=50, rtol=linalg.normalisation_rtol(img_width ** 2))
            self.register_buffer("operator_norm", torch.tensor(_CT_NORMS[key], dtype=dtype, device=device))
            self.normalize = True

    def __getstate__(self):  # pickling / deepcopy: the matrices come back from the cache
        state = super().__getstate__()
        state = dict(state)
        state["_sparse_ops"] = {}
        return state

    def _operators(self, like: torch.Tensor):
        ops = self.__dict__.setdefault("_sparse_ops", {})
        key = (like.dtype, like.device)
        if key not in ops:
            ops[key] = radon_matrices(self.radon, self.img_width, self.circle, like.dtype, like.device,
                                      release_grids=True)
        return ops[key]

    def A(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """Radon transform ``[..., W, W] -> [..., detectors, views]`` (divided by ``operator_norm`` if ``normalize``)."""
        if tuple(x.shape[-2:]) != (self.img_width, self.img_width):
            raise ValueError(f"Input image size {tuple(x.shape[-2:])} does not match the operator image size "
                             f"{(self.img_width, self.img_width)}.")
        out = _SparseMatmul.apply(x, self._operators(x)[0])
        return out / self.operator_norm if self.normalize else out

    def A_adjoint(self, y: torch.Tensor, **kwargs) -> torch.Tensor:
        """Exact transpose of :meth:`A`: ``[..., detectors, views] -> [..., W, W]``."""
        forward, adjoint = self._operators(y)
        if tuple(y.shape[-2:]) != forward.out_shape:
            raise ValueError(f"Sinogram size {tuple(y.shape[-2:])} does not match the operator's "
                             f"(detectors, views) = {forward.out_shape}.")
        out = _SparseMatmul.apply(y, adjoint)
        return out / self.operator_norm if self.normalize else out



def build_physics(cfg: PhysicsConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  rng: Optional[torch.Generator] = None, mask: Optional[torch.Tensor] = None,
                  angles: Optional[Sequence[float]] = None):
    """A deepinv physics for the config, on ``device`` in ``dtype``.

    ``mask`` overrides the generated MRI mask and ``angles`` (degrees) the
    ``views`` equispaced CT angles: for data that carries its own geometry.
    """
    if cfg.modality == "ct":
        # A and A^T are one exact sparse matrix and its transpose (see SparseTomography):
        # <Ax, y> = <x, A^T y> to round-off, and autograd's dA/dx is A itself (finite
        # differences and implicit gradients rely on it). We normalise ourselves:
        # deepinv's own normalisation probes in float32 only and gives a slightly
        # different norm on every construction, which breaks bit-exact resume; ours is a
        # fixed power iteration, cached.
        geometry = cfg.views
        if angles is not None:
            geometry = torch.as_tensor([float(a) for a in angles], dtype=dtype, device=device)
        physics = SparseTomography(angles=geometry, img_width=cfg.img_size, circle=cfg.circle, normalize=True,
                                   device=device, dtype=dtype)
    else:
        if mask is None:
            mask = sampling_mask(cfg, device)
        physics = dinv.physics.MRI(mask=mask.to(device=device, dtype=dtype), img_size=(2, cfg.img_size, cfg.img_size),
                                   device=device)
    physics.noise_model = _noise_model(cfg, rng)
    return physics


def detector_count(img_size: int, circle: bool = False) -> int:
    """Detector cells of deepinv's parallel-beam Radon transform for ``img_size`` (its padding rule)."""
    from deepinv.physics.functional.radon import SQRT2

    if circle:
        return int(img_size)
    return int(img_size) + int((SQRT2 * int(img_size) - int(img_size)).ceil())


def baseline(physics, y: torch.Tensor) -> torch.Tensor:
    """``A^dagger y``: filtered back-projection (CT) or the zero-filled adjoint (MRI)."""
    if isinstance(physics, dinv.physics.Tomography):
        return physics.A_dagger(y, fbp=True)
    return physics.A_adjoint(y)


def to_display(x: torch.Tensor) -> torch.Tensor:
    """Magnitude image ``[B, 1, H, W]``: CT as is, MRI as ``sqrt(re^2 + im^2)``."""
    if x.shape[1] == 2:
        return torch.sqrt(x[:, :1] ** 2 + x[:, 1:] ** 2)
    return x


def to_model_space(images: torch.Tensor, modality: str) -> torch.Tensor:
    """Real images ``[B, 1, H, W]`` -> what the physics takes (MRI: zero imaginary channel)."""
    if modality == "mri" and images.shape[1] == 1:
        return torch.cat([images, torch.zeros_like(images)], dim=1)
    return images


def describe(cfg: PhysicsConfig) -> str:
    """One line naming the operator, for messages and checkpoints."""
    if cfg.modality == "ct":
        return f"{cfg.views}-view parallel-beam CT at {cfg.img_size}x{cfg.img_size}"
    return (f"{cfg.acceleration:g}x {cfg.mask} Cartesian MRI at {cfg.img_size}x{cfg.img_size} "
            f"(centre {cfg.center_fraction:g})")


def operator_norm(physics, shape, device="cpu", dtype=torch.float32, iters: int = 30, rtol: float = 0.0) -> float:
    """``||A||_2`` of a physics by power iteration on ``A^T A`` from a seeded start (1 for the normalised CT operator).

    The start is ``randn(shape)`` from a generator seeded with 0, so the value is
    the same on every construction (see :func:`engine.linalg.operator_norm`);
    ``rtol > 0`` stops once settled (:func:`engine.linalg.largest_eigenvalue`).
    """
    start = torch.randn(shape, device=device, dtype=dtype, generator=torch.Generator(device=device).manual_seed(0))
    return linalg.operator_norm(physics.A, physics.A_adjoint, start, iters, rtol)
