"""CT-GAN's touch-ups of a generated cube: the scan's noise on the generated tissue, and a blend into the
original cube instead of a hard paste of the hole.

A GAN fills the hole with smooth tissue and a hard edge at the hole's faces (the demo Pix2Pix: seam
ratio 1.8, pristine 1.0). CT-GAN (Mirsky et al. 2019, `procedures/attack_pipeline.py`) touches its
output up before saving, and M3Dsynth's Pix2Pix is CT-GAN. Here, on the 1 mm cube:

* noise: Gaussian noise with the grain of the cube's own scanner noise (`scanner_noise`) is added to
  the generated hole, where CT-GAN copies a noise patch from elsewhere in the scan;
* injection: ``f = sigmoid((generated + 700) / 70)`` x the hole's feather: the generated voxels denser
  than lung replace the original, the rest of the hole keeps the original lung, and original tissue
  brighter than the blend (vessels) shows through where ``f`` is low (CT-GAN takes the maximum with the
  original everywhere, which leaves the site's own small nodule as a bright spot inside the new one);
* removal: the generated hole with weights that rise from 0 at the hole's faces to 1 over
  `FEATHER_MM` (CT-GAN's "narrow Gaussian").

The feather is a smoothstep of the distance (voxels, chessboard) from the hole's faces.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import ndimage

from .cube import CUBE_SIZE, hole_mask

FEATHER_MM = 3.0  # the blend reaches full weight 3 mm inside the hole's faces
INJECT_BLEND_CENTER_HU = -700.0  # CT-GAN's sigmoid((generated + 700) / 70)
INJECT_BLEND_WIDTH_HU = 70.0
LUNG_MAX_HU = -600.0  # noise is measured on lung voxels ...
STRUCTURE_MARGIN_VOXELS = 2  # ... at least this far from denser tissue
NOISE_HIGHPASS_SIGMA_MM = 1.0  # noise = what a 1 mm Gaussian blur removes
MIN_NOISE_VOXELS = 200
_SIGMA_GRID = np.round(np.arange(0.0, 2.51, 0.05), 2)


def hole_feather(width_voxels: float = FEATHER_MM) -> np.ndarray:
    """Weights over the cube: 0 outside the hole, a smoothstep to 1 within ``width_voxels`` of its faces."""
    depth = ndimage.distance_transform_cdt(hole_mask(), metric="chessboard").astype(np.float32)
    ramp = np.clip(depth / width_voxels, 0.0, 1.0)
    return ramp * ramp * (3 - 2 * ramp)


def _highpass(cube: np.ndarray) -> np.ndarray:
    return cube - ndimage.gaussian_filter(cube, NOISE_HIGHPASS_SIGMA_MM)


def _lag1_correlation(residual: np.ndarray, region: np.ndarray, axis: int) -> float:
    values, inside = np.moveaxis(residual, axis, 0), np.moveaxis(region, axis, 0)
    pairs = inside[1:] & inside[:-1]
    first, second = values[1:][pairs], values[:-1][pairs]
    return float(np.corrcoef(first, second)[0, 1])


def _blur_response(sigma: float) -> np.ndarray:
    """Frequency response, on the cube's grid, of `scipy.ndimage.gaussian_filter1d` with this sigma
    (the sampled kernel, not the continuous Gaussian: they differ below a voxel)."""
    impulse = np.zeros(CUBE_SIZE)
    impulse[0] = 1.0
    return (
        np.real(np.fft.fft(ndimage.gaussian_filter1d(impulse, sigma, mode="wrap")))
        if sigma > 0
        else np.ones(CUBE_SIZE)
    )


def _lag1_of_blurred_noise(sigmas) -> np.ndarray:
    """Lag-1 correlation along each axis of the high-pass residual of white noise blurred with Gaussian
    ``sigmas`` (z, y, x), from its power spectrum on the cube's grid."""
    responses = [_blur_response(sigma) for sigma in sigmas]
    blur = np.einsum("i,j,k->ijk", *responses)
    smooth = _blur_response(NOISE_HIGHPASS_SIGMA_MM)
    highpass = 1 - np.einsum("i,j,k->ijk", smooth, smooth, smooth)
    covariance = np.real(np.fft.ifftn((blur * highpass) ** 2))
    return np.array([covariance[1, 0, 0], covariance[0, 1, 0], covariance[0, 0, 1]]) / covariance[0, 0, 0]


@lru_cache(maxsize=1)
def _isotropic_table() -> np.ndarray:
    """Lag-1 correlation (along z; all axes alike) for each isotropic sigma of `_SIGMA_GRID`, made monotone."""
    return np.maximum.accumulate([_lag1_of_blurred_noise([sigma] * 3)[0] for sigma in _SIGMA_GRID])


def _blur_for(correlations: list[float], iterations: int = 6) -> np.ndarray:
    """Gaussian sigmas (z, y, x) whose noise has these lag-1 correlations along the three axes: start from
    the isotropic answer of each axis and correct each axis by the isotropic map of its remaining error
    (the axes interact through the isotropic high-pass)."""
    to_sigma = lambda rho: np.interp(rho, _isotropic_table(), _SIGMA_GRID)  # noqa: E731
    target = np.array([to_sigma(rho) for rho in correlations])
    sigmas = target.copy()
    for _ in range(iterations):
        achieved = np.array([to_sigma(rho) for rho in _lag1_of_blurred_noise(sigmas)])
        sigmas = np.clip(sigmas + target - achieved, _SIGMA_GRID[0], _SIGMA_GRID[-1])
    return sigmas


def scanner_noise(original_hu: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise for the cube: white noise blurred with a Gaussian whose width along each axis gives
    the lag-1 correlation that the cube's own high-pass residual has on its lung voxels outside the hole
    (thick slices: long grain along z), scaled to that residual's standard deviation. Zeros when the
    context holds too little lung to measure it."""
    region = ~ndimage.binary_dilation(original_hu > LUNG_MAX_HU, iterations=STRUCTURE_MARGIN_VOXELS) & ~hole_mask()
    if region.sum() < MIN_NOISE_VOXELS:
        return np.zeros_like(original_hu, dtype=np.float32)
    residual = _highpass(original_hu.astype(np.float32))
    sigmas = _blur_for([_lag1_correlation(residual, region, axis) for axis in range(3)])
    noise = ndimage.gaussian_filter(rng.standard_normal(original_hu.shape), sigmas)
    scale = residual[region].std() / max(float(_highpass(noise).std()), 1e-6)
    return (noise * scale).astype(np.float32)


def replacement_weight(generated_hu: np.ndarray, task: str) -> np.ndarray:
    """How much of the original each voxel of the touched-up cube replaces (0-1, what `paste_cube` takes as
    ``replaced``): for an injection the hole's feather x ``sigmoid((generated + 700) / 70)`` of the generated
    cube before its noise, so lung the generator left as lung stays the original's; for a removal the feather."""
    feather = hole_feather()
    if task == "inject":
        return feather / (1 + np.exp(-(generated_hu - INJECT_BLEND_CENTER_HU) / INJECT_BLEND_WIDTH_HU))
    return feather


def touch_up(generated_hu: np.ndarray, original_hu: np.ndarray, task: str, rng: np.random.Generator) -> np.ndarray:
    """The touched-up cube (HU, float32): the original outside the hole, the generated hole with the
    scan's noise blended into the original inside it (module docstring), with `replacement_weight`."""
    weight = replacement_weight(generated_hu, task)
    generated = generated_hu.astype(np.float32) + scanner_noise(original_hu, rng)
    original = original_hu.astype(np.float32)
    blend = weight * generated + (1 - weight) * original
    if task == "inject":
        blend += (1 - weight) * np.maximum(original - blend, 0)
    return np.where(hole_mask(), blend, original).astype(np.float32)
