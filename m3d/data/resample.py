"""Spacing-aware resampling between voxel grids, all through the volumes' affines (LPS mm)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from scipy import ndimage

from .ct import CTVolume

AIR_HU = -1024


def grid_affine(
    origin_mm: np.ndarray | tuple[float, float, float],
    direction: np.ndarray,
    spacing_mm: np.ndarray | tuple[float, float, float],
) -> np.ndarray:
    """4x4 affine of a grid: array index ``(z, y, x, 1)`` -> LPS ``(x, y, z, 1)`` mm."""
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(direction, dtype=np.float64) * np.asarray(spacing_mm, dtype=np.float64)[None, :]
    affine[:3, 3] = origin_mm
    return affine


def sample_grid(
    array: np.ndarray,
    array_affine: np.ndarray,
    grid_affine_: np.ndarray,
    grid_shape: tuple[int, int, int],
    *,
    order: int = 1,
    cval: float = AIR_HU,
) -> np.ndarray:
    """Sample ``array`` (whose index->LPS map is ``array_affine``) on another grid, as float32.

    Points of the new grid outside ``array`` get ``cval`` (air by default). ``order`` is the spline
    order (0 nearest, 1 linear, 3 cubic).
    """
    index_map = np.linalg.inv(array_affine) @ grid_affine_
    return ndimage.affine_transform(
        np.asarray(array, dtype=np.float32),
        index_map[:3, :3],
        offset=index_map[:3, 3],
        output_shape=tuple(int(n) for n in grid_shape),
        order=order,
        mode="constant",
        cval=cval,
        prefilter=order > 1,
    )


def _to_int16(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), -32768, 32767).astype(np.int16)


def resample_to_spacing(
    volume: CTVolume, spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0), *, order: int = 1
) -> CTVolume:
    """Resample to a new spacing ``(dz, dy, dx)`` over the same physical extent.

    The centre of voxel ``[0, 0, 0]`` stays where it is; the new grid covers the old grid's extent
    (from the first to the last voxel centre) rounded to whole voxels.
    """
    new_spacing = np.asarray(spacing_mm, dtype=np.float64)
    if new_spacing.shape != (3,) or np.any(new_spacing <= 0):
        raise ValueError(f"spacing_mm must be three positive numbers (dz, dy, dx); got {spacing_mm}")
    extent_mm = (np.asarray(volume.shape) - 1) * np.asarray(volume.spacing_mm)
    new_shape = tuple(int(n) for n in np.floor(extent_mm / new_spacing + 1e-6).astype(int) + 1)
    new_affine = grid_affine(volume.origin_mm, volume.direction, new_spacing)
    values = sample_grid(volume.hu, volume.affine, new_affine, new_shape, order=order)
    return replace(
        volume,
        hu=_to_int16(values),
        spacing_mm=tuple(new_spacing.tolist()),
        metadata=replace(volume.metadata, source_headers=None),
    )


def resample_to_reference(volume: CTVolume, reference: CTVolume, *, order: int = 1) -> CTVolume:
    """Resample ``volume`` onto ``reference``'s grid (shape, spacing, origin, direction)."""
    values = sample_grid(volume.hu, volume.affine, reference.affine, reference.shape, order=order)
    return replace(reference, hu=_to_int16(values), metadata=replace(volume.metadata, source_headers=None))
