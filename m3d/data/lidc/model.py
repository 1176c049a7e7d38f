"""The LIDC annotation data model: a scan (`LIDCScan`) holds one `Annotation` per reader and nodule, each a
list of `ContourROI` outlines in pixel coordinates, and the readers' `NonNodule` marks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .nodule import Nodule

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


def _values_equal(first: Any, second: Any) -> bool:
    """``==`` that also compares NumPy arrays (shape + values, NaN == NaN) and NaN floats."""
    if isinstance(first, np.ndarray) or isinstance(second, np.ndarray):
        first, second = np.asarray(first), np.asarray(second)
        floats = first.dtype.kind == "f" and second.dtype.kind == "f"
        return first.shape == second.shape and bool(np.array_equal(first, second, equal_nan=floats))
    if isinstance(first, float) and isinstance(second, float) and math.isnan(first) and math.isnan(second):
        return True
    return bool(first == second)


def _dataclass_equal(first: Any, second: Any) -> bool:
    return type(first) is type(second) and all(
        _values_equal(getattr(first, f.name), getattr(second, f.name)) for f in fields(first) if f.compare
    )


def _as_points(points: Any) -> np.ndarray:
    array = np.asarray(points, dtype=np.float64)
    if array.size % 2:
        raise ValueError(f"points must be (n, 2) (x, y) pairs; got shape {array.shape}")
    return array.reshape(-1, 2)


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
        positions = self.z_positions_mm
        if len(positions) == 0:
            raise ValueError(f"scan {self.series_instance_uid or '?'} has no slice positions")
        z = np.asarray(z_mm, dtype=np.float64)
        if len(positions) == 1:
            return np.zeros(z.shape, dtype=np.int64)
        right = np.clip(np.searchsorted(positions, z), 1, len(positions) - 1)
        left = right - 1
        return np.where(np.abs(z - positions[left]) <= np.abs(positions[right] - z), left, right).astype(np.int64)

    def nodules(self, tolerance_mm: float | None = None) -> list[Nodule]:
        """`group_nodules` on this scan."""
        from .grouping import group_nodules  # grouping builds on this module

        return group_nodules(self, tolerance_mm)
