"""CT-GAN's touch-ups (m3d.tamper.touch_up): noise with the scan's grain, the injection and removal
blends, and what they do to a hard-pasted smooth fill."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from m3d.tamper.cube import CUBE_SIZE, hole_mask
from m3d.tamper.touch_up import (
    _highpass,
    _lag1_correlation,
    hole_feather,
    replacement_weight,
    scanner_noise,
    touch_up,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
seam_ratio = importlib.import_module("eval_demo_pipelines").seam_ratio  # the benchmark's measure

SHAPE = (CUBE_SIZE,) * 3
HOLE = hole_mask()
NOISE_BLUR = (1.2, 0.5, 0.5)  # thick slices: long grain along z


def lung_cube(seed: int = 0, noise_hu: float = 20.0) -> np.ndarray:
    """Lung (-850 HU) with anisotropic scanner-like noise and one bright vessel along x through the hole."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal(SHAPE), NOISE_BLUR)
    cube = -850 + noise * noise_hu / _highpass(noise).std()
    cube[16:18, 10:12, :] = 60.0
    return cube.astype(np.float32)


def test_scanner_noise_has_the_cubes_grain_and_level():
    original = lung_cube()
    noise = scanner_noise(original, np.random.default_rng(1))
    region = np.ones(SHAPE, bool)
    measured = _highpass(original)
    lung = ~ndimage.binary_dilation(original > -600, iterations=3) & ~HOLE  # away from the vessel
    assert _highpass(noise).std() == pytest.approx(measured[lung].std(), rel=0.15)
    for axis in range(3):
        assert _lag1_correlation(_highpass(noise), region, axis) == pytest.approx(
            _lag1_correlation(measured, lung, axis), abs=0.1
        )
    assert _lag1_correlation(_highpass(noise), region, 0) > _lag1_correlation(_highpass(noise), region, 2) + 0.2
    np.testing.assert_array_equal(noise, scanner_noise(original, np.random.default_rng(1)))
    no_lung = np.full(SHAPE, 40.0, np.float32)  # soft tissue only: nothing to measure
    assert not scanner_noise(no_lung, np.random.default_rng(1)).any()


def test_feather_rises_from_the_hole_faces():
    feather = hole_feather()
    assert not feather[~HOLE].any() and feather[16, 16, 16] == 1.0
    depth = [feather[16, 16, x] for x in range(6, 16)]
    assert depth[0] < 0.3 and all(a <= b for a, b in zip(depth, depth[1:])) and depth[3] == 1.0


def test_removal_blends_a_smooth_fill_in_without_a_seam():
    original = lung_cube()
    original[10:22, 10:22, 10:22] = 40.0  # the nodule to remove
    smooth_fill = np.where(HOLE, -850.0, original).astype(np.float32)  # flat lung, hard-pasted
    touched = touch_up(smooth_fill, original, "remove", np.random.default_rng(0))
    np.testing.assert_array_equal(touched[~HOLE], original[~HOLE])
    assert abs(touched[12:20, 12:20, 12:20].mean() + 850) < 10  # the nodule is gone at the centre
    assert _highpass(touched)[12:20, 12:20, 12:20].std() > 0.7 * _highpass(original)[(original < -600) & ~HOLE].std()
    assert seam_ratio(touched) < 0.8 * seam_ratio(smooth_fill)


def test_injection_keeps_the_lung_and_the_vessel_around_a_new_nodule():
    original = lung_cube()
    generated = np.full(SHAPE, -850.0, np.float32)  # a smooth generator: flat lung and a 12 mm ball
    distance = np.sqrt(((np.indices(SHAPE) - 15.5) ** 2).sum(0))
    generated[distance < 6] = 30.0
    generated = np.where(HOLE, generated, original)
    touched = touch_up(generated, original, "inject", np.random.default_rng(0))
    np.testing.assert_array_equal(touched[~HOLE], original[~HOLE])
    ball, lung = distance < 4, HOLE & (distance > 8) & (original < -600)
    assert abs(touched[ball].mean() - 30) < 15 and touched[ball].std() > 10  # the nodule, with noise
    np.testing.assert_allclose(touched[lung], original[lung], atol=1.0)  # the lung around it is the scan's
    vessel = HOLE & (original > 0) & (distance > 7)
    assert (touched[vessel] > 0).all()  # the vessel still crosses the hole
    assert seam_ratio(touched) < seam_ratio(generated)


def test_the_replacement_weight_is_what_the_touch_up_took_from_the_generator():
    """A removal replaces the hole by its feather; an injection only the new nodule, not the lung left as lung; the
    touched-up cube is the generated one where the weight is 1 (plus noise) and the original where it is 0."""
    original = lung_cube()
    np.testing.assert_array_equal(replacement_weight(original, "remove"), hole_feather())
    generated = np.full(SHAPE, -850.0, np.float32)
    distance = np.sqrt(((np.indices(SHAPE) - 15.5) ** 2).sum(0))
    generated[distance < 6] = 30.0
    weight = replacement_weight(generated, "inject")
    assert weight[distance < 4].min() > 0.99 and weight[HOLE & (distance > 8)].max() < 0.15
    assert not weight[~HOLE].any()
    touched = touch_up(generated, original, "inject", np.random.default_rng(0))
    kept = HOLE & (weight < 1e-3)
    np.testing.assert_allclose(touched[kept], original[kept], atol=1.0)
