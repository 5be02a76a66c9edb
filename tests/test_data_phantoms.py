"""Procedural phantoms: shapes, ranges, determinism, structure."""

import numpy as np
import pytest

from engine.data import PHANTOM_KINDS, phantom_batch, random_ellipses, shepp_logan
from engine.errors import ConfigError


def test_random_ellipses_shape_range_dtype():
    x = random_ellipses(5, 64, seed=3)
    assert x.shape == (5, 64, 64)
    assert x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert np.isfinite(x).all()


def test_random_ellipses_dtype_option():
    assert random_ellipses(1, 32, dtype=np.float64).dtype == np.float64


def test_random_ellipses_deterministic_and_seed_dependent():
    a = random_ellipses(4, 48, seed=7)
    b = random_ellipses(4, 48, seed=7)
    c = random_ellipses(4, 48, seed=8)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).mean() > 1e-3


def test_random_ellipses_prefix_stable():
    """Image i depends only on (seed, i): asking for more never changes the first ones."""
    np.testing.assert_array_equal(random_ellipses(2, 40, seed=1), random_ellipses(5, 40, seed=1)[:2])


def test_random_ellipses_images_differ_within_batch():
    x = random_ellipses(6, 64, seed=0)
    for i in range(1, 6):
        assert np.abs(x[0] - x[i]).mean() > 1e-3


def test_random_ellipses_ct_like_structure():
    x = random_ellipses(8, 128, seed=2).astype(np.float64)
    for img in x:
        # background (corners) is air = 0
        assert img[:4, :4].max() == 0.0 and img[-4:, -4:].max() == 0.0
        # the centre is inside the body: soft tissue, not air, not bone
        assert 0.0 < np.median(img[56:72, 56:72]) < 0.85
        # a bright rim (skull) exists
        assert img.max() > 0.85
        # many distinct intensities (texture + several inner ellipses)
        body = img[img > 0.05]
        assert body.size > 0.3 * img.size
        assert np.unique(np.round(body, 2)).size > 20
        # the body is not a constant: inner structures change the intensity
        assert body.std() > 0.03


def test_shepp_logan_values():
    s = shepp_logan(128)
    assert s.shape == (128, 128) and s.dtype == np.float32
    assert s.min() == 0.0 and s.max() == pytest.approx(1.0)
    assert s[0, 0] == 0.0  # background
    assert s[64, 64] == pytest.approx(0.2, abs=1e-6)  # brain matter between the features
    # the ventricles (x = +-0.22) are 0
    assert s[64, int((0.22 + 1) / 2 * 128)] == pytest.approx(0.0, abs=1e-6)
    # the bright ellipse at y = +0.35 is in the top half (row 0 = y = +1)
    row = int((1 - 0.35) / 2 * 128)
    assert s[row, 64] == pytest.approx(0.3, abs=1e-6)
    # the outer rim is the brightest part: value 1 on the vertical axis just inside y = 0.92
    assert s[int((1 - 0.9) / 2 * 128), 64] == pytest.approx(1.0, abs=1e-6)


def test_phantom_batch_kinds():
    assert set(PHANTOM_KINDS) == {"ellipses", "shepp_logan"}
    e = phantom_batch("ellipses", 3, 32, seed=4)
    np.testing.assert_array_equal(e, random_ellipses(3, 32, seed=4))
    s = phantom_batch("shepp_logan", 4, 64, seed=1)
    assert s.shape == (4, 64, 64) and s.dtype == np.float32
    assert s.min() >= 0.0 and s.max() <= 1.0
    np.testing.assert_array_equal(s, phantom_batch("shepp_logan", 4, 64, seed=1))
    # variants differ from each other and from the canonical phantom
    base = shepp_logan(64)
    for i in range(4):
        assert np.abs(s[i] - base).mean() > 1e-3
    assert np.abs(s[0] - s[1]).mean() > 1e-3
    # still Shepp-Logan-like: same value set (0, 0.2, 0.3, 0.4, 1)
    assert s.max() == pytest.approx(1.0)
    assert np.mean(np.isclose(s, 0.2, atol=1e-4)) > 0.12


def test_phantom_batch_bad_kind():
    with pytest.raises(ConfigError, match="ellipses"):
        phantom_batch("cats", 2, 32, 0)


@pytest.mark.parametrize("n,size", [(0, 32), (-1, 32), (2, 4), (2, 3.5)])
def test_bad_sizes(n, size):
    with pytest.raises(ValueError):
        random_ellipses(n, size)
