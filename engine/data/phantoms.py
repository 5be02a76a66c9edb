"""Procedural 2-D phantoms: random CT-like ellipse heads and the modified Shepp-Logan.

Everything here is pure NumPy, deterministic for a given seed and rendered
analytically (ellipses with a one-pixel anti-aliased edge), so phantoms of any
size can be generated without data files or downloads.

Coordinates follow the usual phantom convention: the image covers the square
``[-1, 1] x [-1, 1]``, ``x`` grows to the right and ``y`` grows *upwards*
(row 0 is ``y = +1``). Angles are in degrees, counter-clockwise.

Image ``i`` of :func:`random_ellipses` depends only on ``(seed, i, size)``, not
on ``n``, so asking for more phantoms never changes the first ones.
"""

from __future__ import annotations

import numpy as np

from engine.errors import ConfigError

__all__ = ["random_ellipses", "shepp_logan", "phantom_batch", "PHANTOM_KINDS"]

PHANTOM_KINDS = ("ellipses", "shepp_logan")

# Modified Shepp-Logan (Toft 1996): value, semi-axis a (x), semi-axis b (y), x0, y0, phi (deg).
# The values are *added* where ellipses overlap.
_SHEPP_LOGAN = (
    (1.00, 0.6900, 0.9200, 0.00, 0.0000, 0.0),
    (-0.80, 0.6624, 0.8740, 0.00, -0.0184, 0.0),
    (-0.20, 0.1100, 0.3100, 0.22, 0.0000, -18.0),
    (-0.20, 0.1600, 0.4100, -0.22, 0.0000, 18.0),
    (0.10, 0.2100, 0.2500, 0.00, 0.3500, 0.0),
    (0.10, 0.0460, 0.0460, 0.00, 0.1000, 0.0),
    (0.10, 0.0460, 0.0460, 0.00, -0.1000, 0.0),
    (0.10, 0.0460, 0.0230, -0.08, -0.6050, 0.0),
    (0.10, 0.0230, 0.0230, 0.00, -0.6060, 0.0),
    (0.10, 0.0230, 0.0460, 0.06, -0.6050, 0.0),
)


def _check(n: int | None, size: int) -> None:
    if n is not None and (not isinstance(n, (int, np.integer)) or n < 1):
        raise ValueError(f"number of phantoms must be a positive integer, got {n!r}")
    if not isinstance(size, (int, np.integer)) or size < 8 or size > 8192:
        raise ValueError(f"phantom size must be an integer in [8, 8192], got {size!r}")


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates: x along columns (left to right), y along rows (top = +1)."""
    c = (np.arange(size, dtype=np.float64) + 0.5) * (2.0 / size) - 1.0
    return c[None, :], -c[:, None]


def _coverage(x, y, a, b, x0, y0, phi_deg, size) -> np.ndarray:
    """Fraction of each pixel covered by the ellipse (linear ramp one pixel wide at the edge)."""
    t = np.deg2rad(phi_deg)
    ct, st = np.cos(t), np.sin(t)
    dx, dy = x - x0, y - y0
    xr = dx * ct + dy * st
    yr = -dx * st + dy * ct
    r = np.sqrt((xr / a) ** 2 + (yr / b) ** 2)
    # (r - 1) * min(a, b) approximates the signed distance to the boundary (exact for a circle)
    pixel = 2.0 / size
    return np.clip(0.5 - (r - 1.0) * min(a, b) / pixel, 0.0, 1.0)


def _render_additive(ellipses, size: int) -> np.ndarray:
    x, y = _grid(size)
    img = np.zeros((size, size), dtype=np.float64)
    for value, a, b, x0, y0, phi in ellipses:
        img += value * _coverage(x, y, a, b, x0, y0, phi, size)
    return img


def shepp_logan(size: int, dtype=np.float32) -> np.ndarray:
    """The modified (Toft) Shepp-Logan phantom, ``[size, size]`` with values in ``[0, 1]``.

    Background 0, skull 1, brain 0.2, ventricles 0, small features 0.3-0.4.
    """
    _check(None, size)
    return np.clip(_render_additive(_SHEPP_LOGAN, size), 0.0, 1.0).astype(dtype)


def _shepp_logan_variant(size: int, rng: np.random.Generator) -> np.ndarray:
    """Shepp-Logan randomly scaled (0.75-1), rotated (+-30 deg) and shifted (+-0.08), rendered exactly."""
    s = rng.uniform(0.75, 1.0)
    theta = rng.uniform(-30.0, 30.0)
    sx, sy = rng.uniform(-0.08, 0.08, size=2)
    t = np.deg2rad(theta)
    ct, st = np.cos(t), np.sin(t)
    moved = []
    for value, a, b, x0, y0, phi in _SHEPP_LOGAN:
        xs, ys = s * x0, s * y0
        moved.append((value, s * a, s * b, xs * ct - ys * st + sx, xs * st + ys * ct + sy, phi + theta))
    return np.clip(_render_additive(moved, size), 0.0, 1.0)


def _smooth_noise(size: int, rng: np.random.Generator, cycles: float = 6.0) -> np.ndarray:
    """Gaussian random field with unit std and correlation length ~ size / cycles."""
    white = rng.standard_normal((size, size))
    k = np.fft.fftfreq(size) * size  # cycles per image
    k2 = k[:, None] ** 2 + k[None, :] ** 2
    field = np.fft.ifft2(np.fft.fft2(white) * np.exp(-k2 / (2.0 * cycles**2))).real
    std = field.std()
    return field / std if std > 0 else field


def _random_head(size: int, rng: np.random.Generator) -> np.ndarray:
    """One CT-like phantom: bright skull rim, soft-tissue body, organs, small dense/void spots, texture."""
    x, y = _grid(size)
    img = np.zeros((size, size), dtype=np.float64)

    def paint(value, a, b, x0, y0, phi):
        cov = _coverage(x, y, a, b, x0, y0, phi, size)
        img[...] = img * (1.0 - cov) + value * cov
        return cov

    # body with a skull/cortical rim
    a = rng.uniform(0.62, 0.88)
    b = rng.uniform(0.70, 0.92)
    x0, y0 = rng.uniform(-0.05, 0.05, size=2)
    phi = rng.uniform(-15.0, 15.0)
    rim = rng.uniform(0.035, 0.08)
    tissue = rng.uniform(0.25, 0.4)
    paint(rng.uniform(0.85, 1.0), a, b, x0, y0, phi)
    ia, ib = a * (1.0 - rim), b * (1.0 - rim * a / b)
    inside = paint(tissue, ia, ib, x0, y0, phi)
    ctp, stp = np.cos(np.deg2rad(phi)), np.sin(np.deg2rad(phi))

    def place(radius_frac):
        """A random point inside the inner body ellipse, at most radius_frac of the way out."""
        r = radius_frac * np.sqrt(rng.uniform())
        ang = rng.uniform(0, 2 * np.pi)
        u, v = r * ia * np.cos(ang), r * ib * np.sin(ang)
        return x0 + u * ctp - v * stp, y0 + u * stp + v * ctp

    # organs / lesions of varied intensity
    for _ in range(rng.integers(3, 9)):
        ea = rng.uniform(0.05, 0.3) * ia
        eb = rng.uniform(0.05, 0.3) * ib
        cx, cy = place(0.7)
        value = float(np.clip(tissue + rng.uniform(-0.22, 0.3), 0.02, 0.8))
        paint(value, ea, eb, cx, cy, rng.uniform(0, 180))

    # small high-contrast features: calcifications (bright) or air pockets (dark)
    for _ in range(rng.integers(2, 7)):
        r = rng.uniform(0.01, 0.04)
        cx, cy = place(0.85)
        value = rng.uniform(0.88, 1.0) if rng.uniform() < 0.6 else rng.uniform(0.0, 0.05)
        paint(value, r * rng.uniform(0.6, 1.4), r, cx, cy, rng.uniform(0, 180))

    # mild smooth texture inside the body only
    img += rng.uniform(0.015, 0.04) * _smooth_noise(size, rng) * inside
    return np.clip(img, 0.0, 1.0)


def random_ellipses(n: int, size: int, seed: int = 0, dtype=np.float32) -> np.ndarray:
    """``n`` random CT-like ellipse phantoms, ``[n, size, size]`` in ``[0, 1]``.

    Each has an outer body ellipse with a bright rim (skull/cortex), 3-8 inner
    ellipses of varied intensity, 2-6 small high-contrast spots and a mild
    smooth texture. Deterministic for ``seed``; image ``i`` does not depend on ``n``.
    """
    return _seeded_stack(_random_head, n, size, seed, dtype)


def _seeded_stack(draw, n: int, size: int, seed: int, dtype) -> np.ndarray:
    """``[n, size, size]`` of ``draw(size, rng)``, image ``i`` from the ``i``-th child of ``SeedSequence(seed)``.

    Image ``i`` therefore does not depend on ``n``.
    """
    _check(n, size)
    children = np.random.SeedSequence(int(seed)).spawn(int(n))
    out = np.empty((n, size, size), dtype=dtype)
    for i, child in enumerate(children):
        out[i] = draw(size, np.random.default_rng(child))
    return out


def phantom_batch(kind: str, n: int, size: int, seed: int = 0, dtype=np.float32) -> np.ndarray:
    """``n`` phantoms of ``kind`` ("ellipses" or "shepp_logan"), ``[n, size, size]`` in ``[0, 1]``.

    For "shepp_logan" each image is a randomly scaled/rotated/shifted variant
    (image 0 included), deterministic for ``seed``.
    """
    if kind == "ellipses":
        return random_ellipses(n, size, seed=seed, dtype=dtype)
    if kind == "shepp_logan":
        return _seeded_stack(_shepp_logan_variant, n, size, seed, dtype)
    raise ConfigError(f"unknown phantom kind {kind!r}; choose one of {', '.join(PHANTOM_KINDS)}")
