"""The 32 mm cube of the attack: cut it from a scan at 1 mm, mask its centre, paste a result back.

A cube is sampled on a 1 mm isotropic grid whose axes follow the scan's own axes, centred on a world
location (LPS mm). Generators see it scaled to [-1, 1] from a fixed HU window with the centre hole
(CT-GAN's 20^3 voxels, [6, 26) on each axis) set to zero. `paste_cube` resamples the result back to
the scan's grid and blends it in with weights that fall smoothly to zero before the cube's faces. What
the generator kept of the cube goes back as the scan's own voxels (only the change is added), and what it
drew anew replaces the scan beneath it, detail finer than the 1 mm cube included: a 1 mm cube holds a scan
of 0.5-0.98 mm pixels and 1.25-3 mm slices only in part, and adding the change alone would leave the rest
of the replaced content behind (the sharp outline of a removed nodule, up to hundreds of HU). The replaced
voxels then lack the scan's noise finer than the cube. Given a random generator, the paste draws it anew: noise
on the scan's grid with the scan's texture (the neighbour correlations of its finest residual, `finest_grain`,
in-plane and across slices, on the lung the paste keeps around the hole) and, in each of two in-plane bands finer
than the cube (`in_plane_bands`), the noise level that the replaced lung lacks against that kept lung. Levels are
robust (`robust_variance`): the fine structure a 1 mm cube cannot hold (vessel and nodule edges) is not noise,
and noise of its variance would be a trace of its own. Voxels outside the cube are left untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from scipy import ndimage

from ..constants import CUBE_SIZE, CUBE_SPACING_MM, HOLE_SIZE
from ..data.ct import CTVolume, point_text
from ..data.lungs import segment_lungs
from ..data.resample import sample_grid

TRAIN_CUBE_SIZE = 40  # voxels at 1 mm: CT-GAN's 40 mm training cut (the 32 mm cube shifted up to 4 mm each way)
HU_WINDOW = (-1000.0, 600.0)
SCAN_HU_RANGE = (-1024, 3071)
BLEND_FLAT_HALF_MM = HOLE_SIZE / 2  # full weight over the hole ...
BLEND_ZERO_HALF_MM = CUBE_SIZE / 2 - 1.5  # ... falling to zero 1.5 mm inside the faces
GRAIN_HIGHPASS_SIGMA_VOXELS = 0.7  # the finest grain: what an in-plane Gaussian of 0.7 scan pixels removes ...
GRAIN_LUNG_MAX_HU = -600.0  # ... measured on the lung voxels the paste keeps ...
GRAIN_MIN_VOXELS = 100  # ... where there are at least this many (else no grain is drawn)
GRAIN_BAND_EDGES_VOXELS = (0.0, GRAIN_HIGHPASS_SIGMA_VOXELS, 1.5)  # in-plane blurs (pixels) bounding the grain's bands
GRAIN_BLURS_VOXELS = np.round(np.arange(0.0, 2.01, 0.1), 1)  # blurs tried for its texture, across slices and in-plane
GRAIN_FIT_ROUNDS = 3  # rounds of fitting the drawn grain's band powers (the bands overlap a little)


class TamperLocationError(ValueError):
    """A location where a cube cannot be cut or pasted (outside the scan or lungs, too near a nodule)."""


@dataclass
class Cube:
    """A 1 mm cube cut from a scan: ``hu`` float32 ``(32, 32, 32)``, ``affine`` (cube index z, y, x ->
    LPS mm), and the centre it was cut around."""

    hu: np.ndarray
    affine: np.ndarray
    center_lps_mm: np.ndarray


def hu_to_unit(hu):
    """HU -> [-1, 1] over `HU_WINDOW` (clipped); numpy arrays or torch tensors."""
    low, high = HU_WINDOW
    scaled = (hu - low) / (high - low) * 2 - 1
    return scaled.clamp(-1, 1) if torch.is_tensor(scaled) else np.clip(scaled, -1, 1)


def unit_to_hu(unit):
    """[-1, 1] -> HU over `HU_WINDOW`; the inverse of `hu_to_unit` inside the window."""
    low, high = HU_WINDOW
    return (unit + 1) / 2 * (high - low) + low


def hole_mask(shape: tuple[int, int, int] = (CUBE_SIZE,) * 3, hole_size: int = HOLE_SIZE) -> np.ndarray:
    """Boolean mask, True in the centred ``hole_size``^3 hole of a cube of ``shape``."""
    mask = np.zeros(shape, bool)
    mask[tuple(slice((n - hole_size) // 2, (n - hole_size) // 2 + hole_size) for n in shape)] = True
    return mask


def cube_affine(volume: CTVolume, center_lps_mm: np.ndarray) -> np.ndarray:
    """Affine of the 1 mm cube grid centred on ``center_lps_mm`` with the scan's axis directions."""
    affine = np.eye(4)
    affine[:3, :3] = volume.direction * CUBE_SPACING_MM
    half = (CUBE_SIZE - 1) / 2 * CUBE_SPACING_MM
    affine[:3, 3] = np.asarray(center_lps_mm, float) - volume.direction @ np.full(3, half)
    return affine


def _cube_corners_in_scan(volume: CTVolume, affine: np.ndarray) -> np.ndarray:
    corners = np.array(np.meshgrid(*[[0, CUBE_SIZE - 1]] * 3, indexing="ij")).reshape(3, -1).T
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    return volume.world_to_voxel(world)


def check_location(
    volume: CTVolume,
    center_lps_mm: np.ndarray,
    *,
    lung_mask: np.ndarray | None = None,
    allow_outside_lung: bool = False,
    avoid: Iterable[tuple[np.ndarray, float]] = (),
) -> None:
    """Raise `TamperLocationError` unless a cube can be cut and pasted at ``center_lps_mm``.

    ``avoid`` lists other nodules as ``(center_lps_mm, radius_mm)``: none may reach into the hole.
    """
    center = np.asarray(center_lps_mm, float)
    where = f"location {point_text(center)} mm (LPS x, y, z)"
    index = volume.world_to_voxel(center)
    if not volume.contains_voxel(index):
        raise TamperLocationError(
            f"{where} is outside the scan (voxel z, y, x {point_text(index)}, shape {volume.shape})"
        )
    corners = _cube_corners_in_scan(volume, cube_affine(volume, center))
    upper = np.asarray(volume.shape) - 0.5
    overshoot_mm = np.maximum(-0.5 - corners.min(0), corners.max(0) - upper).clip(0) * np.asarray(volume.spacing_mm)
    if np.any(overshoot_mm > 0):
        axis = ("z", "y", "x")[int(np.argmax(overshoot_mm))]
        raise TamperLocationError(
            f"the {CUBE_SIZE} mm cube around {where} reaches {overshoot_mm.max():.1f} mm beyond the scan along {axis}"
        )
    if not allow_outside_lung:
        lungs = segment_lungs(volume) if lung_mask is None else lung_mask
        if not lungs[tuple(np.rint(index).astype(int))]:
            raise TamperLocationError(
                f"{where} is not inside the lungs (allow_outside_lung=True, --allow-outside-lung on "
                "the command line, forces it)"
            )
    reach_mm = HOLE_SIZE / 2 * CUBE_SPACING_MM
    for other_center, radius_mm in avoid:
        offset = np.abs(volume.direction.T @ (np.asarray(other_center, float) - center))
        if np.all(offset < reach_mm + radius_mm):
            raise TamperLocationError(
                f"{where} overlaps another nodule at {point_text(other_center)} mm (radius {radius_mm:.1f} mm)"
            )


def extract_cube(
    volume: CTVolume,
    center_lps_mm: np.ndarray | tuple[float, float, float],
    *,
    lung_mask: np.ndarray | None = None,
    allow_outside_lung: bool = False,
    avoid: Iterable[tuple[np.ndarray, float]] = (),
) -> Cube:
    """Cut the 32 mm cube (32^3 at 1 mm, HU float32) centred on ``center_lps_mm`` after `check_location`."""
    center = np.asarray(center_lps_mm, float)
    check_location(volume, center, lung_mask=lung_mask, allow_outside_lung=allow_outside_lung, avoid=avoid)
    affine = cube_affine(volume, center)
    hu = sample_grid(volume.hu, volume.affine, affine, (CUBE_SIZE,) * 3, order=1)
    return Cube(hu=hu, affine=affine, center_lps_mm=center)


def _blend_weights() -> np.ndarray:
    """Cube-grid weights: 1 over the hole, a cosine ramp to 0 just inside the faces."""
    distance_mm = np.abs(np.arange(CUBE_SIZE) - (CUBE_SIZE - 1) / 2) * CUBE_SPACING_MM
    ramp = (distance_mm - BLEND_FLAT_HALF_MM) / (BLEND_ZERO_HALF_MM - BLEND_FLAT_HALF_MM)
    profile = 0.5 * (1 + np.cos(np.pi * np.clip(ramp, 0, 1)))
    return (profile[:, None, None] * profile[None, :, None] * profile[None, None, :]).astype(np.float32)


def finest_grain(scan_hu: np.ndarray) -> np.ndarray:
    """The finest in-plane grain of ``(z, y, x)`` scan voxels: HU minus an in-plane Gaussian blur of
    ``GRAIN_HIGHPASS_SIGMA_VOXELS`` pixels."""
    return scan_hu - ndimage.gaussian_filter(scan_hu, (0, GRAIN_HIGHPASS_SIGMA_VOXELS, GRAIN_HIGHPASS_SIGMA_VOXELS))


def neighbour_correlation(values: np.ndarray, mask: np.ndarray, axes: tuple[int, ...]) -> float:
    """The correlation of ``(z, y, x)`` values with their next neighbour along each of ``axes`` (the mean over
    them), over the pairs of voxels that both lie in ``mask``: the texture of a grain, 0 for white noise."""
    correlations = []
    for axis in axes:
        ahead, behind = [slice(None)] * 3, [slice(None)] * 3
        ahead[axis], behind[axis] = slice(1, None), slice(None, -1)
        pairs = mask[tuple(ahead)] & mask[tuple(behind)]
        correlations.append(np.corrcoef(values[tuple(ahead)][pairs], values[tuple(behind)][pairs])[0, 1])
    return float(np.mean(correlations))


IN_PLANE, THROUGH_PLANE = (1, 2), (0,)


def in_plane_bands(values: np.ndarray) -> list[np.ndarray]:
    """``(z, y, x)`` values split in-plane into the bands between successive Gaussian blurs of
    ``GRAIN_BAND_EDGES_VOXELS`` pixels, finest first (the first is `finest_grain`)."""
    blurred = [
        ndimage.gaussian_filter(values, (0, sigma, sigma)) if sigma else values for sigma in GRAIN_BAND_EDGES_VOXELS
    ]
    return [finer - coarser for finer, coarser in zip(blurred, blurred[1:])]


def robust_variance(values: np.ndarray) -> float:
    """The variance of Gaussian noise with the median absolute deviation of ``values``: the noise's level, which the
    edges of vessels and of the chest wall in a band do not inflate."""
    return float((1.4826 * np.median(np.abs(values - np.median(values)))) ** 2)


def matched_grain(
    white: np.ndarray, band_variances: np.ndarray, correlations: dict[tuple[int, ...], float]
) -> np.ndarray:
    """Noise with the given variance in each of the `in_plane_bands` whose finest band has the
    `neighbour_correlation` ``correlations[axes]`` across slices and in-plane: ``white`` noise blurred across
    slices, then in-plane, by the ``GRAIN_BLURS_VOXELS`` nearest those, split into the bands and each band scaled
    (refitted ``GRAIN_FIT_ROUNDS`` times, as the bands overlap a little)."""
    everywhere = np.ones(white.shape, bool)
    noise = white
    for axes in (THROUGH_PLANE, IN_PLANE):
        candidates = [
            ndimage.gaussian_filter(noise, [sigma if axis in axes else 0.0 for axis in range(3)])
            for sigma in GRAIN_BLURS_VOXELS
        ]
        misses = [
            abs(neighbour_correlation(finest_grain(c), everywhere, axes) - correlations[axes]) for c in candidates
        ]
        noise = candidates[int(np.argmin(misses))]
    bands = in_plane_bands(noise)
    gains = np.sqrt(band_variances / np.array([band.var() for band in bands]))
    for _ in range(GRAIN_FIT_ROUNDS):
        drawn = np.array([band.var() for band in in_plane_bands(sum(gain * band for gain, band in zip(gains, bands)))])
        gains = np.where(drawn > 0, gains * np.sqrt(band_variances / np.maximum(drawn, 1e-12)), 0.0)
    return sum(gain * band for gain, band in zip(gains, bands))


def paste_cube(
    volume: CTVolume,
    cube: Cube,
    generated_hu: np.ndarray,
    *,
    replaced: np.ndarray,
    grain_rng: np.random.Generator | None,
) -> tuple[CTVolume, np.ndarray]:
    """Paste a generated cube (HU, ``(32, 32, 32)``, same grid as ``cube``) back into ``volume``.

    ``replaced`` (same shape, 0-1): how much of the scan's own content each generated voxel takes the place of,
    1 where the generator drew the voxel anew (a generated hole; `m3d.tamper.touch_up.replacement_weight` after
    CT-GAN's touch-ups), 0 where it kept the scan and at most added to it. There the scan ends up as the generated
    cube resampled onto its grid; elsewhere the change is added to the scan's own voxels, so an unchanged cube
    with ``replaced`` 0 pastes back bit-identical. With ``grain_rng`` the replaced voxels also get the scan's noise
    finer than the cube (`matched_grain`): in each of the `in_plane_bands`, the `robust_variance` of the scan on the
    lung that the paste keeps around the hole less that of the replaced lung (all of it where that lung is under
    100 voxels), in the texture of the kept lung's `finest_grain`; no grain where the kept lung is under 100
    voxels. None leaves the replaced voxels as smooth as the resampled cube. Returns the
    tampered volume and the boolean ``(z, y, x)`` mask of the voxels that changed. Voxels outside the cube's
    footprint are bit-identical to the input.
    """
    generated = np.asarray(generated_hu, np.float32)
    share = np.asarray(replaced, np.float32)
    for name, array in (("generated cube", generated), ("replaced", share)):
        if array.shape != (CUBE_SIZE,) * 3:
            raise ValueError(f"{name} must have shape {(CUBE_SIZE,) * 3}; got {array.shape}")
    if share.min() < 0 or share.max() > 1:
        raise ValueError(f"replaced must lie in [0, 1]; got {share.min():.3g} to {share.max():.3g}")
    corners = _cube_corners_in_scan(volume, cube.affine)
    low = np.clip(np.floor(corners.min(0)).astype(int), 0, None)
    high = np.minimum(np.ceil(corners.max(0)).astype(int) + 1, volume.shape)
    region = tuple(slice(a, b) for a, b in zip(low, high))
    region_affine = volume.affine.copy()
    region_affine[:3, 3] = volume.voxel_to_world(low)
    shape = tuple(int(n) for n in high - low)

    def on_scan_grid(array: np.ndarray) -> np.ndarray:
        return sample_grid(array, cube.affine, region_affine, shape, order=1, cval=0.0)

    weights = on_scan_grid(_blend_weights())
    share_on_scan = on_scan_grid(share)
    change = on_scan_grid(generated - cube.hu)
    original = volume.hu[region].astype(np.float32)
    finer_than_cube = original - on_scan_grid(cube.hu)  # the scan's content that the 1 mm cube does not hold
    smooth = original + weights * (change - share_on_scan * finer_than_cube)
    pasted = smooth
    if grain_rng is not None:
        kept_lung = (weights > 0.5) & (share_on_scan < 0.01) & (original < GRAIN_LUNG_MAX_HU)
        replaced_lung = (weights * share_on_scan > 0.5) & (smooth < GRAIN_LUNG_MAX_HU)
        if kept_lung.sum() >= GRAIN_MIN_VOXELS:
            scan_bands = in_plane_bands(original)  # the first is the scan's finest grain
            lacking = np.array([robust_variance(band[kept_lung]) for band in scan_bands])
            if replaced_lung.sum() >= GRAIN_MIN_VOXELS:  # less what the replaced lung holds already
                lacking -= np.array([robust_variance(band[replaced_lung]) for band in in_plane_bands(smooth)])
            noise = matched_grain(
                grain_rng.standard_normal(shape).astype(np.float32),
                np.maximum(lacking, 0.0),
                {axes: neighbour_correlation(scan_bands[0], kept_lung, axes) for axes in (THROUGH_PLANE, IN_PLANE)},
            )
            pasted = smooth + weights * share_on_scan * noise
    blended = np.clip(np.rint(pasted), *SCAN_HU_RANGE)
    blended = np.where(weights > 0, blended, original).astype(np.int16)
    tampered = volume.hu.copy()
    tampered[region] = blended
    changed = np.zeros(volume.shape, bool)
    changed[region] = blended != volume.hu[region]
    return volume.with_hu(tampered), changed


def training_cube_affine(volume: CTVolume, center_lps_mm: np.ndarray, size: int = TRAIN_CUBE_SIZE) -> np.ndarray:
    """Affine of the 1 mm ``size``^3 grid centred on ``center_lps_mm`` with the scan's axes: the 32 mm
    cube's grid (`cube_affine`) grown by ``(size - 32) / 2`` voxels on every side."""
    affine = cube_affine(volume, center_lps_mm).copy()
    margin = (size - CUBE_SIZE) / 2
    affine[:3, 3] -= affine[:3, :3] @ np.full(3, margin)
    return affine


def cut_training_cube(volume: CTVolume, center_lps_mm: np.ndarray, size: int = TRAIN_CUBE_SIZE) -> np.ndarray:
    """The ``size``^3 1 mm cube (HU float32) centred on ``center_lps_mm``; voxels beyond the scan take
    the value of the nearest voxel inside it."""
    affine = training_cube_affine(volume, center_lps_mm, size)
    cube = sample_grid(volume.hu, volume.affine, affine, (size,) * 3, order=1, cval=np.nan)
    outside = np.isnan(cube)
    if outside.all():
        raise TamperLocationError(f"the {size} mm cube around {point_text(center_lps_mm)} mm is outside the scan")
    if outside.any():
        nearest = ndimage.distance_transform_edt(outside, return_distances=False, return_indices=True)
        cube = cube[tuple(nearest)]
    return cube.astype(np.float32)
