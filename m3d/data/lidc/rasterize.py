"""Contours to voxels: the pixels an LIDC outline encloses, one annotation's mask on a scan grid, and
contour points as voxel indices.

An LIDC outline is drawn on the first pixels *outside* the nodule, so a contour's region is the pixel
centres strictly inside the polygon (contour pixels excluded, as pylidc's ``boolean_mask``). An exclusion
ROI (``inclusion=False``) removes its interior and its outline. An ROI enclosing no pixel centre (a single
point marking a nodule < 3 mm, a segment, a tiny loop) marks its own pixels instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from .model import Annotation, LIDCScan


def ranges(counts: np.ndarray) -> np.ndarray:
    """``concatenate([arange(c) for c in counts])`` without a Python loop."""
    counts = np.asarray(counts, dtype=np.int64)
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)


def closing_order(sizes: np.ndarray) -> np.ndarray:
    """Index of each point's successor in concatenated closed polygons of ``sizes`` points."""
    ends = np.cumsum(sizes)
    following = np.arange(int(ends[-1]) if len(ends) else 0) + 1
    following[ends - 1] = ends - sizes
    return following


def _set_pixels(image: np.ndarray, planes: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> None:
    keep = (rows >= 0) & (rows < image.shape[1]) & (cols >= 0) & (cols < image.shape[2])
    image[planes[keep], rows[keep], cols[keep]] = True


def rasterize_polygons(
    polygons: Sequence[np.ndarray], row0: int, col0: int, nrows: int, ncols: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(interior, outline)`` boolean ``(len(polygons), nrows, ncols)`` images of closed polygons (``(n, 2)``
    x, y points) over the pixel window starting at ``(row0, col0)``: pixel centres strictly inside (even-odd
    rule, sparse scanline fill) and pixel centres lying exactly on an edge."""
    n_polygons = len(polygons)
    sizes = np.array([len(p) for p in polygons], dtype=np.int64)
    points = np.concatenate(polygons)
    plane = np.repeat(np.arange(n_polygons), sizes)
    following = closing_order(sizes)
    x1, y1 = points[:, 0], points[:, 1]
    x2, y2 = x1[following], y1[following]
    low, high = np.minimum(y1, y2), np.maximum(y1, y2)
    sloped = np.flatnonzero(y1 != y2)

    def rows_of(edges: np.ndarray, first: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        count = np.maximum(count, 0)
        edge = np.repeat(edges, count)
        row = np.repeat(first, count) + ranges(count)
        x = x1[edge] + (row - y1[edge]) * (x2[edge] - x1[edge]) / (y2[edge] - y1[edge])
        return edge, row.astype(np.int64) - row0, x

    # Even-odd fill: each edge crossing a row (half-open in y) flips the parity of every pixel centre to
    # its right; a cumulative sum of the flips along the row gives the parity.
    first = np.ceil(low[sloped])
    edge, row, x = rows_of(sloped, first, (np.ceil(high[sloped]) - first).astype(np.int64))
    col = np.clip(np.floor(x).astype(np.int64) + 1 - col0, 0, ncols)
    keep = (row >= 0) & (row < nrows)
    index = ((plane[edge] * nrows + row) * (ncols + 1) + col)[keep]
    flips = np.bincount(index, minlength=n_polygons * nrows * (ncols + 1)).reshape(n_polygons, nrows, ncols + 1)
    interior = (np.cumsum(flips, axis=2)[:, :, :ncols] & 1).astype(bool)

    outline = np.zeros((n_polygons, nrows, ncols), dtype=bool)
    edge, row, x = rows_of(sloped, first, (np.floor(high[sloped]) - first).astype(np.int64) + 1)
    hit = np.abs(x - np.rint(x)) < 1e-6
    _set_pixels(outline, plane[edge][hit], row[hit], np.rint(x[hit]).astype(np.int64) - col0)
    flat = np.flatnonzero((y1 == y2) & (np.abs(y1 - np.rint(y1)) < 1e-6))
    start = np.ceil(np.minimum(x1, x2)[flat] - 1e-6).astype(np.int64)
    count = np.maximum(np.floor(np.maximum(x1, x2)[flat] + 1e-6).astype(np.int64) - start + 1, 0)
    _set_pixels(
        outline,
        np.repeat(plane[flat], count),
        np.repeat(np.rint(y1[flat]).astype(np.int64) - row0, count),
        np.repeat(start, count) + ranges(count) - col0,
    )
    return interior & ~outline, outline


def annotation_mask(annotation: Annotation, slices: np.ndarray, window: tuple[slice, slice, slice]) -> np.ndarray:
    """One annotation's boolean mask over ``window`` of the scan grid (``slices``: each ROI's slice index)."""
    z0, row0, col0 = (s.start for s in window)
    shape = tuple(s.stop - s.start for s in window)
    mask = np.zeros(shape, dtype=bool)
    rois = annotation.rois
    interior, outline = rasterize_polygons([roi.points_xy_px for roi in rois], row0, col0, shape[1], shape[2])
    for i in sorted(range(len(rois)), key=lambda i: not rois[i].inclusion):  # holes last
        k = int(slices[i]) - z0
        if not 0 <= k < shape[0]:
            continue
        if rois[i].inclusion:
            region = interior[i]
            if not region.any():  # a point, a segment or a tiny loop: its own pixels
                region = outline[i].copy()
                vertices = np.rint(rois[i].points_xy_px).astype(np.int64)
                rows, cols = vertices[:, 1] - row0, vertices[:, 0] - col0
                _set_pixels(region[None], np.zeros(len(vertices), np.int64), rows, cols)
            mask[k] |= region
        else:
            mask[k] &= ~(interior[i] | outline[i])
    return mask


def contour_voxel_indices(annotation: Annotation, scan: LIDCScan) -> np.ndarray:
    """All contour points of an annotation as ``(slice, row, column)`` indices in the scan grid."""
    slices = scan.slice_index([roi.z_mm for roi in annotation.rois])
    return np.concatenate(
        [
            np.column_stack([np.full(roi.n_points, k, np.float64), roi.points_xy_px[:, ::-1]])
            for roi, k in zip(annotation.rois, slices)
        ]
    )
