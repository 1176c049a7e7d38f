"""Noise: smooth correlated random fields (tissue texture) and the scanner's blur and noise."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from .constants import HU_CLIP
from .grid import Grid

if TYPE_CHECKING:
    from .anatomy import Anatomy


def _bump_matrix(fine: np.ndarray, coarse: np.ndarray, sigma: float) -> np.ndarray:
    """Row-normalised (unit sum of squares) Gaussian weights from coarse lattice to fine coordinates."""
    weights = np.exp(-0.5 * ((fine[:, None] - coarse[None, :]) / sigma) ** 2)
    weights[weights < 1e-4] = 0.0
    weights /= np.sqrt(np.maximum((weights**2).sum(axis=1, keepdims=True), 1e-12))
    return weights.astype(np.float32)


class SmoothNoise:
    """Unit-variance smooth random field with correlation length ~``scale_mm`` over a grid's extent:
    Gaussian bumps on a coarse lattice, evaluated separably one slice at a time."""

    def __init__(
        self, rng: np.random.Generator, x_mm: np.ndarray, y_mm: np.ndarray, z_mm: np.ndarray, scale_mm: float
    ) -> None:
        step = scale_mm
        sigma = 0.75 * scale_mm

        def lattice(coords: np.ndarray) -> np.ndarray:
            low, high = float(coords.min()) - 2 * step, float(coords.max()) + 2 * step
            return np.arange(low, high + step, step)

        lattice_x, lattice_y, lattice_z = lattice(x_mm), lattice(y_mm), lattice(z_mm)
        self.values = rng.standard_normal((len(lattice_z), len(lattice_y), len(lattice_x))).astype(np.float32)
        self.weights_x = _bump_matrix(x_mm, lattice_x, sigma)
        self.weights_y = _bump_matrix(y_mm, lattice_y, sigma)
        self.weights_z = _bump_matrix(z_mm, lattice_z, sigma)

    def slice(self, k: int) -> np.ndarray:
        """The field on slice ``k`` of the grid, ``(rows, columns)``."""
        row = self.weights_z[k]
        nonzero = np.flatnonzero(row)
        plane = np.tensordot(row[nonzero], self.values[nonzero], axes=(0, 0))
        return self.weights_y @ plane @ self.weights_x.T


def add_scanner_noise(hu: np.ndarray, grid: Grid, anatomy: Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Scanner blur, CT-like noise, rounding to int16 and clipping (float32 ``hu`` is consumed).

    The noise is white noise shaped like filtered back-projection noise: band-pass in-plane (little
    power at low frequencies, fine grain at ``noise_corr_mm``), a little stronger laterally (longer
    paths through the body), and correlated between neighbouring slices when they overlap
    (reconstruction step < slice thickness).
    """
    pixel = grid.pixel_spacing
    blur_px = max(0.35, 0.42 / pixel)
    grain_px = max(0.45, anatomy.noise_corr_mm / pixel)
    wide_px = grain_px * 3.0
    lateral = (1.0 + 0.6 * (grid.x_mm / (anatomy.cavity_half_width + 40.0)) ** 2).astype(np.float32)[None, :]
    overlap = float(np.clip(1.0 - grid.slice_step / max(grid.thickness, 1e-6), 0.0, 0.5))
    # mix: the share of the previous slice's noise that gives neighbours the correlation ``overlap``
    mix = 0.0 if overlap <= 0 else (1.0 - math.sqrt(max(1.0 - 4.0 * overlap * overlap, 0.0))) / (2.0 * overlap)
    weight_now, weight_previous = 1.0 / math.sqrt(1.0 + mix * mix), mix / math.sqrt(1.0 + mix * mix)
    out = np.empty(hu.shape, dtype=np.int16)
    previous = None
    for k in range(hu.shape[0]):
        plane = ndimage.gaussian_filter(hu[k], blur_px, mode="nearest")
        white = rng.standard_normal(plane.shape, dtype=np.float32)
        fine = ndimage.gaussian_filter(white, grain_px, mode="wrap")
        noise = fine - 0.6 * ndimage.gaussian_filter(fine, wide_px, mode="wrap")
        noise *= 1.0 / float(noise.std() + 1e-6)
        if previous is not None and mix > 0:
            noise, previous = weight_now * noise + weight_previous * previous, noise
        else:
            previous = noise
        plane += anatomy.noise_sigma * lateral * noise
        np.clip(np.rint(plane), HU_CLIP[0], HU_CLIP[1], out=plane)
        out[k] = plane
    return out
