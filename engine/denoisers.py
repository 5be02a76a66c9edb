r"""Contractive CNN denoisers for the DEQ fixed-point map, and their weights files.

Both networks here have the *averaged* form

.. math::

    D(x) = L \, \frac{x + U(x)}{2},

where ``L = lipschitz`` (default 0.95) and ``U`` is a CNN built so that, with
spectrally normalised convolutions and no normalisation layers, it is
1-Lipschitz. Then

.. math::

    \|D(x) - D(y)\| \le \frac{L}{2}\big(\|x - y\| + \|U(x) - U(y)\|\big)
                    \le L \, \|x - y\|,

so ``D`` is an ``L``-contraction and the PGD / HQS fixed-point maps built on it
(with a non-expansive data-consistency step) converge.

Spectral normalisation (:class:`ConvSpectralNorm`) divides each convolution
weight by an estimate of the operator norm of *the convolution itself*
(power iteration with ``conv2d`` / ``conv_transpose2d`` on an image-shaped
vector), not of the reshaped ``[C_out, C_in*k*k]`` weight matrix that
``torch.nn.utils.spectral_norm`` uses. The two can differ by a factor of up to
``k`` (3 for 3x3 kernels) in either direction, so the reshaped-matrix norm
does not bound the layer.

Caveats, stated where they apply:

* The power-iteration estimate is a *lower* bound of the layer's norm that
  converges from below; it is computed on a ``32 x 32`` zero-padded domain,
  whose norm is within ~0.3 % of the norm on any larger image. After ~30
  iterations from a random start the estimate is typically 1-2 % low; the
  persistent vector keeps improving it during training
  (:data:`SPECTRAL_NORM_TRAIN_ITERS` warm-started iterations each time the
  weights change). :func:`refresh_spectral_norms` runs more.
* ``norm="group"`` inserts GroupNorm, which is not globally Lipschitz
  (its Jacobian scales like ``1 / sqrt(var + eps)``); with it the bound above
  does not hold, only the empirical estimate of :mod:`engine.linalg` does.

Both denoisers follow the deepinv convention ``forward(x, sigma=None)``, so
``deepinv.optim.PnP(denoiser)`` works. A blind network ignores ``sigma``; with
``noise_level_input=True`` (:class:`ResUNet`) it is *conditioned* on it, as
DRUNet is: a constant map ``sigma`` is an extra input channel. A blind
denoiser, used as a PnP/DEQ prior, judges the noise from its input, and at a
fixed point its input looks nearly clean, so it barely regularises (streaks
that look like structure survive); a conditioned one applies the strength it
is told, which makes ``sigma`` the DEQ's regularisation parameter
(``deq.sigma``, learnable), playing the part of TV's ``lambda``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from engine.atomic import atomic_write
from engine.errors import CheckpointError, ConfigError
from engine.linalg import power_iteration

__all__ = [
    "ConvSpectralNorm",
    "conv_spectral_norm",
    "refresh_spectral_norms",
    "sync_spectral_norms",
    "ResUNet",
    "DnCNN",
    "build_denoiser",
    "Conv3x3",
    "set_channels_last",
    "uses_channels_last",
    "load_denoiser_weights",
    "save_denoiser_weights",
    "GROUP_NORM_EPS",
]

#: GroupNorm epsilon. PyTorch's 1e-5 lets the Jacobian reach ~316 x gamma on a
#: feature map that is constant over a group (e.g. a blank or all-zero input,
#: the usual DEQ initial iterate); 1e-3 caps that at ~32 x gamma while being
#: negligible next to the variance of real feature maps.
GROUP_NORM_EPS = 1e-3

#: Negative slope of the LeakyReLU activations (any slope in [0, 1] is 1-Lipschitz).
LEAKY_SLOPE = 0.2

#: Side of the square domain on which the power iteration estimates conv norms.
SPECTRAL_NORM_INPUT_SIZE = 32

#: Power iterations run when a spectrally normalised conv is created.
SPECTRAL_NORM_INIT_ITERS = 30

#: Power iterations run (warm-started) each time the weights change in training mode.
#: One, as in Miyato et al., is not enough here: the optimiser grows singular directions the
#: lagging vector does not see, so sigma is underestimated, the network briefly exceeds its
#: Lipschitz bound, and as the estimate catches up the function drifts with no weight change
#: (measured: with the learning rate set to 0 after 30 steps, the training loss still doubled).
SPECTRAL_NORM_TRAIN_ITERS = 10

#: Whether GroupNorm runs in channels-last too when the convolutions do. Its channels-last CPU
#: kernels are less accurate: a ResUNet's weight gradients measured 4x further from float64
#: (1.2e-5 vs 2.9e-6 relative) than in the ordinary layout, so by default it is handed
#: contiguous activations.
GROUP_NORM_CHANNELS_LAST = False

_INV_SQRT2 = 1.0 / math.sqrt(2.0)


# ---------------------------------------------------------------------------------------
# Spectral normalisation of a convolution as an operator
# ---------------------------------------------------------------------------------------

def _tensor_key(t: torch.Tensor):
    """Identity of a tensor's *contents*: storage address and in-place version counter.

    Optimiser steps, ``load_state_dict`` and ``.double()``/``.to()`` all change
    one of the two, so a changed key means "these weights are new".
    Returns None for tensors that do not expose them (functorch wrappers).
    """
    try:
        return (t.data_ptr(), t._version)
    except (RuntimeError, AttributeError, NotImplementedError):
        return None


def _inside_functorch_transform() -> bool:
    """True while a torch.func transform (vjp, jvp, grad, vmap) is running, where buffers must not be mutated."""
    try:
        return torch._C._functorch.peek_interpreter_stack() is not None
    except AttributeError:  # private API gone: assume not, as before it existed
        return False


class ConvSpectralNorm(nn.Module):
    r"""Parametrisation ``W -> W / sigma(W)`` with ``sigma`` the operator norm of the conv.

    The convolution ``A_W : R^{C_in x n x n} -> R^{C_out x m x m}`` (with the
    conv's own stride, padding, dilation and groups, zero padding) is a linear
    map; its norm is estimated by power iteration on ``A_W^T A_W``:

    .. math::

        u \leftarrow \frac{A_W^T A_W u}{\|A_W^T A_W u\|}, \qquad
        \sigma(W) = \|A_W u\| \quad (\|u\| = 1),

    where ``A_W`` is ``F.conv2d`` and ``A_W^T`` is ``F.conv_transpose2d`` with the
    same geometry. ``u`` (shape ``[1, C_in, n, n]``) and ``sigma`` are buffers, so
    they live in the ``state_dict`` and follow ``.to()`` / ``.double()``.

    When the estimate moves: ``init_iters`` (~30) iterations at construction,
    then, in training mode, :data:`SPECTRAL_NORM_TRAIN_ITERS` (10) iterations each time the weight changes
    (detected by the weight's storage and in-place version counter: an
    optimiser step, ``load_state_dict``, ``.to()`` / ``.double()``). Between
    weight changes the estimate is frozen, so a DEQ solve sees one fixed map
    however many times it calls the denoiser. In eval mode ``u`` never moves
    and the stored ``sigma`` is used; it is re-measured as ``||A_W u||`` only
    if the weight changed since (e.g. after the last optimiser step), so the
    invariant ``sigma = ||A_W u||`` always holds for the current weight and a
    reloaded state dict reproduces the saved model.

    In training mode with autograd on, ``sigma = ||A_W u||`` is recomputed
    differentiably (``u`` fixed), so the gradient sees the normalisation, as in
    Miyato et al. (2018). Inside ``torch.func`` transforms no state is changed.

    Parameters
    ----------
    conv:
        The ``nn.Conv2d`` to normalise (read for its geometry and weight).
    input_size:
        Side of the square domain of the power iteration. Zero-padded
        convolution norms grow with the domain towards their
        infinite-domain value; 32 is within ~0.3 % of it for 3x3 kernels.
    init_iters:
        Power iterations run now. 0 (with weights loaded afterwards) skips the cost.
    """

    def __init__(self, conv: nn.Conv2d, input_size: int = SPECTRAL_NORM_INPUT_SIZE,
                 init_iters: int = SPECTRAL_NORM_INIT_ITERS, eps: float = 1e-12):
        super().__init__()
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"ConvSpectralNorm needs an nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"ConvSpectralNorm supports zero padding only, got padding_mode='{conv.padding_mode}'")
        if isinstance(conv.padding, str):
            raise ValueError(f"ConvSpectralNorm needs numeric padding, got padding='{conv.padding}'")
        self.stride = tuple(conv.stride)
        self.padding = tuple(conv.padding)
        self.dilation = tuple(conv.dilation)
        self.groups = conv.groups
        self.eps = eps
        n = int(input_size)
        if n < 1:
            raise ValueError(f"input_size must be >= 1, got {input_size}")
        # conv_transpose2d must map back onto exactly [n, n]: the output_padding
        # absorbs the rows/columns a strided conv drops.
        output_padding = []
        for s, p, dil, k in zip(self.stride, self.padding, self.dilation, conv.kernel_size):
            out = (n + 2 * p - dil * (k - 1) - 1) // s + 1
            if out < 1:
                raise ValueError(f"input_size {n} is too small for kernel {tuple(conv.kernel_size)}")
            output_padding.append(n - ((out - 1) * s - 2 * p + dil * (k - 1) + 1))
        self.output_padding = tuple(output_padding)

        weight = conv.weight.detach()
        u = torch.randn(1, conv.in_channels, n, n, dtype=weight.dtype, device=weight.device)
        self.register_buffer("u", u / u.norm())
        self.register_buffer("sigma", torch.ones((), dtype=weight.dtype, device=weight.device))
        self._weight_key = None  # the weight sigma was last measured for
        self._advanced_key = None  # the weight u was last advanced for in training
        with torch.no_grad():
            self._update(weight, int(init_iters))
        self._weight_key = self._advanced_key = _tensor_key(conv.weight)

    # The operator and its adjoint -----------------------------------------------------
    def apply_conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``A_W x`` (no bias: the bias does not change the Lipschitz constant)."""
        return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)

    def apply_conv_adjoint(self, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``A_W^T y``, the exact adjoint of :meth:`apply_conv` on the ``[n, n]`` domain."""
        return F.conv_transpose2d(y, weight, None, self.stride, self.padding,
                                  self.output_padding, self.groups, self.dilation)

    @torch.no_grad()
    def _power_iteration(self, weight: torch.Tensor, n_iters: int) -> None:
        """Advance the stored ``u`` by ``n_iters`` warm-started power iterations on ``A_W^T A_W``."""
        u, _ = power_iteration(lambda v: self.apply_conv_adjoint(self.apply_conv(v, weight), weight), self.u,
                               n_iters, eps=self.eps)
        self.u.copy_(u)

    def _sigma_of(self, weight: torch.Tensor) -> torch.Tensor:
        # clone: a later in-place update of the buffer must not invalidate a
        # graph that saved u for the backward pass.
        return self.apply_conv(self.u.clone(), weight).norm()

    @torch.no_grad()
    def _update(self, weight: torch.Tensor, n_iters: int) -> None:
        self._power_iteration(weight.detach(), n_iters)
        self.sigma.copy_(self._sigma_of(weight.detach()))

    def refresh(self, weight: torch.Tensor, n_iters: int = 100) -> float:
        """Run ``n_iters`` more power iterations on ``weight``; returns the new sigma."""
        self._update(weight, n_iters)
        self._weight_key = self._advanced_key = _tensor_key(weight)
        return float(self.sigma)

    # Parametrisation ------------------------------------------------------------------
    def sync(self, weight: torch.Tensor) -> bool:
        """Bring ``u`` / ``sigma`` up to date for ``weight``; True when the weight is new.

        The stateful half of :meth:`forward`, callable on its own: a compiled denoiser
        (``run.compile``) cannot mutate buffers or branch on Python state without a
        recompilation per optimiser step, so :func:`sync_spectral_norms` runs this
        eagerly before each compiled call and the traced :meth:`forward` only divides.
        """
        key = _tensor_key(weight)
        if key is None or _inside_functorch_transform():
            return False
        if self.training and key != self._advanced_key:
            # New weights in training: advance u by SPECTRAL_NORM_TRAIN_ITERS iterations
            # and re-measure sigma, keeping the invariant sigma = ||A_W u|| for the current W.
            self._update(weight, SPECTRAL_NORM_TRAIN_ITERS)
            self._weight_key = self._advanced_key = key
            return True
        if key != self._weight_key:
            # New weights in evaluation: re-measure sigma only (evaluation never moves u), and
            # leave the advance to the next training forward, exactly as after a checkpoint load
            # (which is why resuming from a step that validated is bit-exact).
            self._update(weight, 0)
            self._weight_key = key
            return True
        return False

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # synced eagerly by sync_spectral_norms before the call
            changed = False
        else:
            self.sync(weight)
            key = _tensor_key(weight)
            changed = key is not None and key != self._weight_key  # only inside torch.func transforms
        if changed or (self.training and torch.is_grad_enabled() and weight.requires_grad):
            # Differentiable (and, inside torch.func transforms, which forbid
            # mutating buffers, stateless) sigma = ||A_W u||; equal in value to
            # the stored one whenever the weights have not changed.
            sigma = self._sigma_of(weight)
        else:
            sigma = self.sigma
        return weight / sigma.clamp_min(self.eps)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        # Assigning conv.weight sets the raw (unnormalised) weight.
        return weight

    def extra_repr(self) -> str:
        return f"input_size={self.u.shape[-1]}, sigma={float(self.sigma):.4g}"


def conv_spectral_norm(conv: nn.Conv2d, input_size: int = SPECTRAL_NORM_INPUT_SIZE,
                       init_iters: int = SPECTRAL_NORM_INIT_ITERS) -> nn.Conv2d:
    """Register :class:`ConvSpectralNorm` on ``conv.weight`` in place; returns ``conv``.

    The raw weight then lives at ``conv.parametrizations.weight.original`` and
    the buffers at ``conv.parametrizations.weight.0.{u,sigma}``.
    """
    sn = ConvSpectralNorm(conv, input_size, init_iters)
    parametrize.register_parametrization(conv, "weight", sn)
    # Registration re-sets the raw weight in place (bumping its version); it is unchanged.
    sn._weight_key = sn._advanced_key = _tensor_key(conv.parametrizations.weight.original)
    return conv


def _spectral_norms(module: nn.Module):
    for sub in module.modules():
        if parametrize.is_parametrized(sub, "weight"):
            for p in sub.parametrizations.weight:
                if isinstance(p, ConvSpectralNorm):
                    yield sub, p


@torch.no_grad()
def sync_spectral_norms(module: nn.Module) -> int:
    """Run every spectral norm's bookkeeping (:meth:`ConvSpectralNorm.sync`) eagerly; returns how many were new."""
    return sum(sn.sync(conv.parametrizations.weight.original) for conv, sn in _spectral_norms(module))


def refresh_spectral_norms(module: nn.Module, n_iters: int = 100) -> dict[str, float]:
    """Run ``n_iters`` extra power iterations on every :class:`ConvSpectralNorm` in ``module``.

    Use before export or before relying on the Lipschitz bound of a freshly
    built network. Returns ``{conv name: sigma}``.
    """
    names = {sub: name for name, sub in module.named_modules()}
    out = {}
    for conv, sn in _spectral_norms(module):
        out[names[conv]] = sn.refresh(conv.parametrizations.weight.original, n_iters)
    return out


# ---------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------

class Conv3x3(nn.Conv2d):
    """A 3x3 ``same`` convolution that can run in channels-last memory format.

    With ``channels_last`` set (:func:`set_channels_last`) the weight is handed to
    the convolution in channels-last layout, so oneDNN (CPU) computes in NHWC and
    the activations stay NHWC between layers; the parameter itself keeps its
    ordinary layout, so checkpoints, optimiser state and the spectral-norm
    bookkeeping see nothing different; the input is handed over with channels-last
    strides too (:func:`_channels_last`). Same arithmetic up to float32 rounding
    (measured on the CPU at 128 px, GroupNorm ResUNet, GroupNorm itself kept
    contiguous (:data:`GROUP_NORM_CHANNELS_LAST`): a training step 15 % faster
    than in the contiguous layout: ``benchmarks/README.md``).
    """

    channels_last = False
    #: the convolution of ``input_scale * x``, computed as ``(input_scale W) * x + b``
    input_scale = 1.0
    #: ``output_scale`` times the convolution, computed as ``(output_scale W) * x + output_scale b``
    output_scale = 1.0

    def _conv_forward(self, input, weight, bias):
        # The network's constant factors (2 avgpool, up / 2, cat / sqrt 2, the ResBlock's average) go
        # onto the small weight instead of a pass over the activations in the forward and in every
        # vector-Jacobian product; for powers of two the result is the same bit for bit.
        scale = self.input_scale * self.output_scale
        if scale != 1.0:
            weight = weight * scale
        if self.output_scale != 1.0 and bias is not None:
            bias = bias * self.output_scale
        if self.channels_last:
            weight = weight.contiguous(memory_format=torch.channels_last)
            input = _channels_last(input)
        return super()._conv_forward(input, weight, bias)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` with channels-last strides, so that the convolution returns channels-last activations.

    oneDNN picks the output's layout from the input's: an image of 1 channel is contiguous and
    channels-last at once, reported as contiguous, so the first convolution of a network would
    return contiguous activations and every layer after it would convert them (measured: the
    ResUNet's decoder merged a contiguous skip with channels-last features, ~16 % of a forward).
    A 1-channel image gets channel stride 1 (a view, nothing copied); more channels are copied.
    """
    if x.dim() != 4 or (x.is_contiguous(memory_format=torch.channels_last) and x.stride(1) == 1):
        return x
    if x.shape[1] == 1 and x.is_contiguous():
        batch, _, height, width = x.shape
        return x.view(batch, height, width, 1).permute(0, 3, 1, 2)
    return x.contiguous(memory_format=torch.channels_last)


def set_channels_last(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch every :class:`Conv3x3` in ``module`` to (or back from) channels-last; returns ``module``."""
    for sub in module.modules():
        if isinstance(sub, Conv3x3):
            sub.channels_last = bool(enabled)
    return module


def uses_channels_last(module: nn.Module) -> bool:
    """Whether any convolution of ``module`` runs channels-last."""
    return any(isinstance(sub, Conv3x3) and sub.channels_last for sub in module.modules())


def _conv3x3(c_in: int, c_out: int, spectral_norm: bool, sn_init_iters: int, input_scale: float = 1.0,
             output_scale: float = 1.0) -> nn.Conv2d:
    conv = Conv3x3(c_in, c_out, 3, padding=1)
    conv.input_scale, conv.output_scale = float(input_scale), float(output_scale)
    if spectral_norm:
        conv_spectral_norm(conv, init_iters=sn_init_iters)
    return conv


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "none":
        return nn.Identity()
    if norm == "group":
        return nn.GroupNorm(math.gcd(channels, 8), channels, eps=GROUP_NORM_EPS)
    raise ValueError(f"norm must be 'group' or 'none', got {norm!r}")


class _ResBlock(nn.Module):
    r"""``h -> (h + conv2(act(norm(conv1(h))))) / 2``: 1-Lipschitz when both convs are and norm is the identity."""

    def __init__(self, channels: int, norm: str, spectral_norm: bool, sn_init_iters: int):
        super().__init__()
        self.conv1 = _conv3x3(channels, channels, spectral_norm, sn_init_iters)
        self.norm = _norm_layer(norm, channels)
        self.act = nn.LeakyReLU(LEAKY_SLOPE)
        self.conv2 = _conv3x3(channels, channels, spectral_norm, sn_init_iters, output_scale=0.5)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        u = self.conv1(h)
        if isinstance(self.norm, nn.GroupNorm) and not GROUP_NORM_CHANNELS_LAST:
            u = u.contiguous()  # the next conv takes either layout
        return torch.add(self.conv2(self.act(self.norm(u))), h, alpha=0.5)  # conv2 halves its own output


def _check_input(x: torch.Tensor, in_channels: int, name: str) -> None:
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(f"{name} expects input of shape [B, {in_channels}, H, W], got {list(x.shape)}")


class _AveragedDenoiser(nn.Module):
    """Shared ``D(x) = L (x + U(x)) / 2`` wrapper and metadata."""

    def __init__(self, in_channels: int, lipschitz: float, spectral_norm: bool, norm: str):
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if not 0.0 < lipschitz <= 1.0:
            raise ValueError(f"lipschitz must be in (0, 1], got {lipschitz}")
        self.in_channels = in_channels
        self.lipschitz = float(lipschitz)
        self.spectral_norm = bool(spectral_norm)
        self.norm = norm

    @property
    def lipschitz_bound(self) -> float:
        """``lipschitz`` when the architecture guarantees it (spectral norm, no GroupNorm), else ``inf``.

        The guarantee is up to the accuracy of the power-iteration estimates of
        the conv norms (see the module docstring).
        """
        return self.lipschitz if self.spectral_norm and self.norm == "none" else math.inf

    noise_level_input = False

    def residual(self, x: torch.Tensor) -> torch.Tensor:  # U(x), or U([x, sigma map]) when conditioned
        raise NotImplementedError

    def forward(self, x: torch.Tensor, sigma=None, **kwargs) -> torch.Tensor:
        """``D(x) = lipschitz * (x + U(x)) / 2``; ``sigma`` is used only by a noise-level-conditioned network."""
        _check_input(x, self.in_channels, type(self).__name__)
        if self.noise_level_input:
            return self.lipschitz * 0.5 * (x + self.residual(torch.cat([x, noise_level_map(sigma, x)], dim=1)))
        return self.lipschitz * 0.5 * (x + self.residual(x))


def noise_level_map(sigma, like: torch.Tensor) -> torch.Tensor:
    """``[B, 1, H, W]`` constant map of ``sigma`` (a float, or one value per sample) shaped like ``like``."""
    if sigma is None:
        raise ValueError("this denoiser is conditioned on the noise level: call it as denoiser(x, sigma)")
    level = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if level.dim() > 0:
        level = level.reshape(-1, 1, 1, 1)
    return level.expand(like.shape[0], 1, *like.shape[-2:])


# ---------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------

class ResUNet(_AveragedDenoiser):
    r"""Residual U-Net denoiser ``D(x) = L (x + U(x)) / 2`` that is provably ``L``-Lipschitz.

    ``U`` maps ``[B, C, H, W] -> [B, C, H, W]`` (``C = in_channels``: 1 for CT,
    2 for MRI real/imaginary) through ``depth`` levels of widths
    ``channels * 2**l`` (capped at ``8 * channels``)::

        head conv -> [ResBlock -> skip; 2*avgpool2 -> conv] x depth -> ResBlock
                  -> [up/2 -> conv -> cat(., skip)/sqrt2 -> conv -> ResBlock] x depth -> tail conv

    Lipschitz bound, for ``spectral_norm=True, norm="none"`` (every factor is
    1-Lipschitz, and compositions multiply constants):

    * each conv: ``||A_W / sigma(W)|| = 1`` (see :class:`ConvSpectralNorm`); biases do not matter;
    * LeakyReLU: slope in ``[0.2, 1]``, so 1-Lipschitz;
    * ResBlock ``(h + F(h)) / 2`` with ``F`` 1-Lipschitz: ``(1 + 1) / 2 = 1``;
    * ``2 * avgpool2x2``: ``avgpool = U_2^T / 4`` with ``U_2`` the nearest x2
      upsampling, so ``||avgpool|| = ||U_2|| / 4 = 1/2`` and the factor 2 gives 1;
    * ``nearest_up_x2 / 2``: ``||U_2 x||^2 = 4 ||x||^2``, so ``||U_2|| = 2`` and
      the factor 1/2 gives 1 (an isometry);
    * skip ``s -> cat(g(s), s) / sqrt(2)`` with ``g`` (the deeper path) 1-Lipschitz:
      ``(||g(s)-g(t)||^2 + ||s-t||^2) / 2 <= ||s-t||^2``;
    * zero padding to a multiple of ``2**depth`` is an isometric embedding and
      the final crop has norm 1 (reflect padding would repeat pixels and could
      cost up to a factor sqrt(2), which is why it is not used).

    Hence ``Lip(U) <= 1`` and ``Lip(D) <= L (1 + 1) / 2 = L``.

    With ``norm="group"`` (GroupNorm after the first conv of each ResBlock, the
    paper's choice) the bound does **not** hold: GroupNorm is not globally
    Lipschitz (its Jacobian scales like ``gamma / sqrt(var + eps)``, unbounded
    as a group's variance goes to 0). ``eps`` is raised to
    :data:`GROUP_NORM_EPS` so that it stays finite and moderate on flat inputs.
    """

    def __init__(self, in_channels: int = 1, channels: int = 32, depth: int = 2, norm: str = "group",
                 spectral_norm: bool = True, lipschitz: float = 0.95,
                 sn_init_iters: int = SPECTRAL_NORM_INIT_ITERS, noise_level_input: bool = False):
        super().__init__(in_channels, lipschitz, spectral_norm, norm)
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        _norm_layer(norm, 8)  # validate early
        self.depth = depth
        self.noise_level_input = bool(noise_level_input)
        widths = [min(channels * 2 ** level, channels * 8) for level in range(depth + 1)]
        self.widths = widths
        block = lambda ch: _ResBlock(ch, norm, spectral_norm, sn_init_iters)
        conv = lambda a, b, scale=1.0: _conv3x3(a, b, spectral_norm, sn_init_iters, input_scale=scale)

        self.head = conv(in_channels + int(self.noise_level_input), widths[0])
        self.encoders = nn.ModuleList(block(widths[l]) for l in range(depth))
        # the factors 2 (after avgpool), 1/2 (after the upsampling) and 1/sqrt(2) (after the skip's
        # concatenation) of the bound below are applied by the convolution that follows each
        self.downs = nn.ModuleList(conv(widths[l], widths[l + 1], 2.0) for l in range(depth))
        self.bottleneck = block(widths[depth])
        self.ups = nn.ModuleList(conv(widths[l + 1], widths[l], 0.5) for l in range(depth))
        self.merges = nn.ModuleList(conv(2 * widths[l], widths[l], _INV_SQRT2) for l in range(depth))
        self.decoders = nn.ModuleList(block(widths[l]) for l in range(depth))
        self.tail = conv(widths[0], in_channels)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """``U`` of the (padded) input; with noise-level input, ``x`` carries the sigma map as its last channel."""
        height, width = x.shape[-2:]
        multiple = 2 ** self.depth
        pad_h, pad_w = (-height) % multiple, (-width) % multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))  # zeros: an isometric embedding
        h = self.head(x)
        skips = []
        for encode, down in zip(self.encoders, self.downs):
            h = encode(h)
            skips.append(h)
            h = down(F.avg_pool2d(h, 2))  # (x 2 in down)
        h = self.bottleneck(h)
        for level in reversed(range(self.depth)):
            h = self.ups[level](F.interpolate(h, scale_factor=2, mode="nearest"))  # (/ 2 in ups)
            h = self.merges[level](torch.cat([h, skips[level]], dim=1))  # (/ sqrt 2 in merges)
            h = self.decoders[level](h)
        return self.tail(h)[..., :height, :width]


class DnCNN(_AveragedDenoiser):
    r"""DnCNN-style denoiser ``D(x) = L (x + U(x)) / 2``, provably ``L``-Lipschitz without norm layers.

    ``U = conv_out o [act o norm o conv]^(depth-2) o act o conv_in``: ``depth``
    3x3 convolutions of width ``channels``. With spectral normalisation each
    conv has norm 1 and LeakyReLU is 1-Lipschitz, so ``Lip(U) <= 1`` and
    ``Lip(D) <= L``. ``norm="group"`` (GroupNorm in the hidden layers) breaks
    the guarantee, as explained in :class:`ResUNet`.
    """

    def __init__(self, in_channels: int = 1, channels: int = 32, depth: int = 6, spectral_norm: bool = True,
                 lipschitz: float = 0.95, norm: str = "none", sn_init_iters: int = SPECTRAL_NORM_INIT_ITERS):
        super().__init__(in_channels, lipschitz, spectral_norm, norm)
        if depth < 2:
            raise ValueError(f"DnCNN depth (number of convolutions) must be >= 2, got {depth}")
        _norm_layer(norm, 8)
        self.depth = depth
        layers = [_conv3x3(in_channels, channels, spectral_norm, sn_init_iters), nn.LeakyReLU(LEAKY_SLOPE)]
        for _ in range(depth - 2):
            layers += [_conv3x3(channels, channels, spectral_norm, sn_init_iters),
                       _norm_layer(norm, channels), nn.LeakyReLU(LEAKY_SLOPE)]
        layers.append(_conv3x3(channels, in_channels, spectral_norm, sn_init_iters))
        self.body = nn.Sequential(*layers)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def build_denoiser(model_cfg, in_channels: int, *, load_weights: bool = False) -> nn.Module:
    """The denoiser a :class:`engine.config.ModelConfig` describes (random initialisation).

    ``model_cfg.depth`` is the number of U-Net levels, or for DnCNN a third of
    its convolutions (``depth=2`` -> 6 convs); ``model_cfg.norm`` applies to
    both. With ``load_weights=True`` and ``model_cfg.weights`` set, that file
    is loaded (:func:`load_denoiser_weights`) and the power iterations at
    construction are skipped, since the file carries the estimates. Choosing a
    shipped pretrained file when ``weights`` is empty is left to the caller.
    """
    weights = (model_cfg.weights or "").strip() if load_weights else ""
    sn_init_iters = 0 if weights else SPECTRAL_NORM_INIT_ITERS
    common = dict(in_channels=in_channels, channels=model_cfg.channels, norm=model_cfg.norm,
                  spectral_norm=model_cfg.spectral_norm, lipschitz=model_cfg.lipschitz,
                  sn_init_iters=sn_init_iters)
    if model_cfg.denoiser == "resunet":
        net = ResUNet(depth=model_cfg.depth, noise_level_input=model_cfg.noise_level, **common)
    elif model_cfg.denoiser == "dncnn":
        if model_cfg.noise_level:
            raise ConfigError("model.noise_level = true needs model.denoiser = 'resunet'")
        net = DnCNN(depth=3 * model_cfg.depth, **common)
    else:
        raise ConfigError(f"model.denoiser must be 'resunet' or 'dncnn', got {model_cfg.denoiser!r}")
    if weights:
        load_denoiser_weights(net, weights)
    return net


# ---------------------------------------------------------------------------------------
# Weights files
# ---------------------------------------------------------------------------------------

_WRAPPER_KEYS = ("state_dict", "denoiser", "model")
_STRIPPABLE_PREFIXES = ("module.", "denoiser.")


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_safetensors(path: Path) -> bool:
    """safetensors files start with an 8-byte little-endian header length and a JSON ``{``."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _read_weights(path: Path):
    try:
        if _is_safetensors(path):
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip, safetensors and OS errors all mean "unreadable"
        raise CheckpointError(f"{path.name}: not a readable weights file (corrupt, truncated or unsafe): "
                              f"{_first_line(exc)}") from None


def _extract_state_dict(obj, name: str, expected: Mapping[str, torch.Tensor]) -> dict:
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:  # a training checkpoint that wraps the weights
            inner = obj.get(key)
            if isinstance(inner, Mapping) and key not in expected:
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{name}: holds a {type(obj).__name__}, not a dict of denoiser weights")
    state = dict(obj)
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{name}: entry '{key}' is a {type(value).__name__}, not a tensor")
    for prefix in _STRIPPABLE_PREFIXES:
        if state and all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in expected):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _spectral_norm_hint(missing: str, available) -> str:
    if ".parametrizations.weight." in missing and missing.replace("parametrizations.weight.original", "weight") in available:
        return " (the file was saved without spectral normalisation; set model.spectral_norm = false)"
    if missing.endswith(".weight") and missing[:-len("weight")] + "parametrizations.weight.original" in available:
        return " (the file was saved with spectral normalisation; set model.spectral_norm = true)"
    return ""


def load_denoiser_weights(module: nn.Module, path) -> nn.Module:
    """Load a local ``.pt``/``.pth`` (``torch.load(weights_only=True)``) or ``.safetensors`` file into ``module``.

    The format is recognised from the file's first bytes, not its name. A
    checkpoint dict that wraps the weights under ``state_dict``, ``denoiser``
    or ``model`` is unwrapped, and a ``module.`` / ``denoiser.`` prefix on every
    key is stripped. Raises :class:`~engine.errors.CheckpointError` with a
    one-line message for a missing, unreadable or non-matching file (naming
    the first mismatching key and, for shapes, both shapes), or non-finite values.
    Returns ``module``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"denoiser weights file not found: {path}")
    name = path.name
    expected = module.state_dict()
    state = _extract_state_dict(_read_weights(path), name, expected)

    problems = []
    for key, tensor in expected.items():
        if key not in state:
            problems.append(f"key '{key}' is missing from the file{_spectral_norm_hint(key, state)}")
        elif tuple(state[key].shape) != tuple(tensor.shape):
            problems.append(f"'{key}' has shape {tuple(state[key].shape)} in the file "
                            f"but {tuple(tensor.shape)} in the model")
    problems += [f"the file has unexpected key '{key}'" for key in state if key not in expected]
    if problems:
        more = f" ({len(problems) - 1} more mismatches)" if len(problems) > 1 else ""
        raise CheckpointError(f"{name} does not fit this denoiser: {problems[0]}{more}")
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"{name}: '{key}' contains NaN or Inf values")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{name} does not fit this denoiser: {_first_line(exc)}") from None
    return module


def save_denoiser_weights(module: nn.Module, path) -> None:
    """Write ``module.state_dict()`` to ``path`` atomically (:func:`engine.atomic.atomic_write`).

    ``.safetensors`` paths get the safetensors format, anything else ``torch.save``.
    """
    path = Path(path)
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in module.state_dict().items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as fh:
            if path.suffix.lower() == ".safetensors":
                from safetensors.torch import save

                fh.write(save(state))
            else:
                torch.save(state, fh)
    except OSError as exc:
        raise CheckpointError(f"cannot write denoiser weights to {path}: {exc.strerror or exc}") from None
