"""Natural images for denoiser pre-training, read from an installed package (never downloaded).

The paper pre-trains its denoiser on natural images (BSD500). Offline, the
images that scikit-image ships inside its wheel (``skimage/data``) are the
closest at hand. Only those whose scikit-image docstring states a public-domain
or CC0 status are used (:data:`NATURAL_IMAGES` lists each with it). They are
read where the package installed them, converted to grey levels in ``[0, 1]``;
nothing is copied into this project.

scikit-image is an optional dependency (``pip install equideq[pretrain]``);
without it :func:`natural_images` raises a :class:`~engine.errors.ConfigError`
that says so.
"""

from __future__ import annotations

import numpy as np

from engine.errors import ConfigError

__all__ = ["NATURAL_IMAGES", "natural_images"]

#: scikit-image sample image -> its licence as scikit-image's docstring states it
NATURAL_IMAGES = {
    "astronaut": "public domain (NASA)",
    "brick": "CC0 (CC0Textures)",
    "camera": "CC0 (Lav Varshney)",
    "cell": "CC0",
    "chelsea": "CC0 (Stefan van der Walt)",
    "clock": "public domain (Stefan van der Walt)",
    "coffee": "CC0 (Rachel Michetti)",
    "coins": "no known copyright restrictions (Library of Congress)",
    "grass": "CC0 (CC0Textures)",
    "gravel": "CC0 (CC0Textures)",
    "hubble_deep_field": "public domain (NASA)",
    "immunohistochemistry": "no known copyright restrictions",
    "retina": "CC0 1.0",
    "rocket": "public domain (SpaceX)",
    "text": "public domain",
}


def _grey(image: np.ndarray) -> np.ndarray:
    x = np.asarray(image, dtype=np.float32)
    if x.ndim == 3:
        x = x[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    low, high = float(x.min()), float(x.max())
    return (x - low) / (high - low) if high > low else np.zeros_like(x)


def natural_images(names=None) -> list[np.ndarray]:
    """The named (default: all of :data:`NATURAL_IMAGES`) sample images as 2-D float32 arrays in ``[0, 1]``."""
    names = list(NATURAL_IMAGES) if names is None else list(names)
    unknown = [n for n in names if n not in NATURAL_IMAGES]
    if unknown:
        raise ConfigError(f"unknown natural image '{unknown[0]}' (known: {', '.join(NATURAL_IMAGES)})")
    try:
        import skimage.data
    except ImportError:
        raise ConfigError("natural images for pre-training come from scikit-image, which is not installed "
                          "(pip install scikit-image, or the project's [pretrain] extra)") from None
    return [_grey(getattr(skimage.data, name)()) for name in names]
