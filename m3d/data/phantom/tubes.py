"""Tubes (chains of capsules) in mm and their rendering: partial-volume painting, sub-voxel splatting and
a signed distance field."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from ..lidc.rasterize import ranges
from .grid import Grid

Box = tuple[slice, slice, slice]


@dataclass
class Tubes:
    """Capsule segments ``p0 -> p1`` (X, Y, Z mm) with radii ``r0 -> r1``."""

    p0: np.ndarray
    p1: np.ndarray
    r0: np.ndarray
    r1: np.ndarray

    @staticmethod
    def from_polyline(points: Sequence[Sequence[float]], radii: Sequence[float] | float) -> Tubes:
        points = np.asarray(points, dtype=np.float64)
        radii = np.broadcast_to(np.asarray(radii, dtype=np.float64), (len(points),))
        return Tubes(points[:-1].copy(), points[1:].copy(), radii[:-1].copy(), radii[1:].copy())

    @staticmethod
    def concat(parts: Sequence[Tubes]) -> Tubes:
        parts = [p for p in parts if len(p.r0)]
        if not parts:
            return Tubes(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0), np.zeros(0))
        return Tubes(*(np.concatenate([getattr(p, n) for p in parts]) for n in ("p0", "p1", "r0", "r1")))

    def scaled(self, factor: float) -> Tubes:
        return Tubes(self.p0, self.p1, self.r0 * factor, self.r1 * factor)

    def subset(self, which: np.ndarray) -> Tubes:
        return Tubes(self.p0[which], self.p1[which], self.r0[which], self.r1[which])

    def __len__(self) -> int:
        return len(self.r0)


def _boxes(grid: Grid, tubes: Tubes, margin: float, slab: bool) -> tuple[np.ndarray, np.ndarray]:
    """Voxel bounding boxes ``(n, 6)`` = z0, z1, y0, y1, x0, x1 of all segments, and which are non-empty."""
    half_thickness = 0.5 * grid.thickness if slab else 0.0
    reach = np.maximum(tubes.r0, tubes.r1) + margin
    low = np.minimum(tubes.p0, tubes.p1) - reach[:, None]
    high = np.maximum(tubes.p0, tubes.p1) + reach[:, None]
    box = np.stack(
        [
            np.searchsorted(grid.z_mm, low[:, 2] - half_thickness, "left"),
            np.searchsorted(grid.z_mm, high[:, 2] + half_thickness, "right"),
            np.searchsorted(grid.y_mm, low[:, 1], "left"),
            np.searchsorted(grid.y_mm, high[:, 1], "right"),
            np.searchsorted(grid.x_mm, low[:, 0], "left"),
            np.searchsorted(grid.x_mm, high[:, 0], "right"),
        ],
        axis=1,
    )
    valid = (box[:, 0] < box[:, 1]) & (box[:, 2] < box[:, 3]) & (box[:, 4] < box[:, 5])
    return box, valid


def _capsule_fields(
    grid: Grid, tubes: Tubes, margin: float, slab: bool
) -> Iterator[tuple[int, Box, np.ndarray, float, float]]:
    """Per segment touching the grid: (index, bounding-box slices, distance minus radius (mm), max
    radius, |cosine of the axis with z|). With ``slab``, distances along z shrink by half the slice
    thickness (a thin structure anywhere within a slice's slab shows in that slice)."""
    half_thickness = 0.5 * grid.thickness
    if not len(tubes):
        return
    boxes, valid = _boxes(grid, tubes, margin, slab)
    for i in np.flatnonzero(valid):
        z0, z1, y0, y1, x0, x1 = (int(v) for v in boxes[i])
        start, end = tubes.p0[i], tubes.p1[i]
        r0, r1 = tubes.r0[i], tubes.r1[i]
        axis = end - start
        length2 = float(axis @ axis)
        rel_x = (grid.x_mm[x0:x1] - start[0])[None, None, :]
        rel_y = (grid.y_mm[y0:y1] - start[1])[None, :, None]
        rel_z = (grid.z_mm[z0:z1] - start[2])[:, None, None]
        if length2 > 1e-9:
            t = np.clip((rel_x * axis[0] + rel_y * axis[1] + rel_z * axis[2]) / length2, 0.0, 1.0)
        else:
            t = np.zeros((1, 1, 1))
        off_x, off_y, off_z = rel_x - t * axis[0], rel_y - t * axis[1], rel_z - t * axis[2]
        if slab:
            off_z = np.maximum(np.abs(off_z) - half_thickness, 0.0)
        distance = np.sqrt(off_x * off_x + off_y * off_y + off_z * off_z)
        radius = r0 + t * (r1 - r0)
        axis_z_cosine = abs(axis[2]) / math.sqrt(length2) if length2 > 1e-9 else 1.0
        yield i, (slice(z0, z1), slice(y0, y1), slice(x0, x1)), distance - radius, max(r0, r1), axis_z_cosine


def paint_tubes(
    hu: np.ndarray,
    grid: Grid,
    tubes: Tubes,
    value: float | np.ndarray,
    *,
    mask: np.ndarray | None = None,
    strength: float = 1.0,
    thin_below: float = 0.0,
) -> None:
    """Composite tubes of HU ``value`` over ``hu`` with partial volume (in place), only where ``mask``.

    Segments thinner than ``thin_below`` (mm) are splatted instead (their blood volume spread over the
    voxels it falls in): exact partial volume for sub-voxel vessels and much faster.
    """
    pixel, thickness = grid.pixel_spacing, grid.thickness
    values = np.broadcast_to(np.asarray(value, dtype=np.float32), (len(tubes),))
    thin = np.maximum(tubes.r0, tubes.r1) < thin_below
    if thin.any():
        if np.ptp(values[thin]) > 0:
            raise ValueError("splatted tubes must share one value")
        _splat_tubes(hu, grid, tubes.subset(thin), float(values[thin][0]), mask, strength)
        keep = ~thin
        tubes, values = tubes.subset(keep), values[keep]
    for i, box, signed_distance, radius, axis_z_cosine in _capsule_fields(grid, tubes, pixel, slab=True):
        occupancy = np.clip(0.5 - signed_distance / pixel, 0.0, 1.0)
        fill_z = 1.0 - (1.0 - min(1.0, 2.0 * radius / thickness)) * (1.0 - axis_z_cosine)
        fill_xy = min(1.0, 2.2 * radius / pixel)
        occupancy = occupancy * (strength * fill_z * fill_xy)
        if mask is not None:
            occupancy = occupancy * mask[box]
        target = hu[box]
        target += (occupancy * (values[i] - target)).astype(np.float32)


def _splat_tubes(
    hu: np.ndarray, grid: Grid, tubes: Tubes, value: float, mask: np.ndarray | None, strength: float
) -> None:
    """Sub-voxel vessels: sample each segment finely, spread each sample's volume (pi r^2 dl) over its
    8 neighbouring voxels (trilinear), and composite with the voxel fraction it fills."""
    if not len(tubes):
        return
    nz, ny, nx = grid.shape
    pixel, slice_step = grid.pixel_spacing, grid.slice_step
    step = 0.5 * min(pixel, slice_step)
    axis = tubes.p1 - tubes.p0
    length = np.sqrt((axis**2).sum(axis=1))
    n_samples = np.maximum(1, np.ceil(length / step).astype(np.int64))
    segment = np.repeat(np.arange(len(n_samples)), n_samples)
    t = (ranges(n_samples) + 0.5) / n_samples[segment]
    points = tubes.p0[segment] + t[:, None] * axis[segment]
    radius = tubes.r0[segment] + t * (tubes.r1[segment] - tubes.r0[segment])
    volume = np.pi * radius**2 * (length[segment] / n_samples[segment])
    # fractional voxel indices of the samples
    fz = (points[:, 2] - grid.z_mm[0]) / slice_step
    fy = (points[:, 1] - grid.y_mm[0]) / pixel
    fx = (points[:, 0] - grid.x_mm[0]) / pixel
    inside = (fz > -1) & (fz < nz) & (fy > -1) & (fy < ny) & (fx > -1) & (fx < nx)
    if not inside.any():
        return
    fz, fy, fx = fz[inside], fy[inside], fx[inside]
    volume = volume[inside] * (strength / (pixel * pixel * slice_step))
    iz, iy, ix = np.floor(fz).astype(np.int64), np.floor(fy).astype(np.int64), np.floor(fx).astype(np.int64)
    wz, wy, wx = fz - iz, fy - iy, fx - ix
    flat_indices, weights = [], []
    for step_z, weight_z in ((0, 1 - wz), (1, wz)):
        for step_y, weight_y in ((0, 1 - wy), (1, wy)):
            for step_x, weight_x in ((0, 1 - wx), (1, wx)):
                kz, ky, kx = iz + step_z, iy + step_y, ix + step_x
                ok = (kz >= 0) & (kz < nz) & (ky >= 0) & (ky < ny) & (kx >= 0) & (kx < nx)
                flat_indices.append((kz[ok] * ny + ky[ok]) * nx + kx[ok])
                weights.append((volume * weight_z * weight_y * weight_x)[ok])
    touched, inverse = np.unique(np.concatenate(flat_indices), return_inverse=True)
    alpha = np.minimum(np.bincount(inverse, weights=np.concatenate(weights)), 1.0).astype(np.float32)
    if mask is not None:
        alpha *= mask.reshape(-1)[touched]
    flat = hu.reshape(-1)
    current = flat[touched]
    flat[touched] = current + alpha * (value - current)


def tube_sdf(grid: Grid, tubes: Tubes, cap: float) -> np.ndarray:
    """Signed distance (mm, negative inside) to the union of tubes, capped at ``cap``."""
    sdf = np.full(grid.shape, cap, dtype=np.float32)
    for _, box, signed_distance, _, _ in _capsule_fields(grid, tubes, cap, slab=False):
        np.minimum(sdf[box], signed_distance.astype(np.float32), out=sdf[box])
    return sdf
