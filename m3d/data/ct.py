"""`CTVolume`: a CT scan in Hounsfield units with its physical geometry.

Conventions (the one place where they are defined):

* ``hu[z, y, x]`` is an int16 array in Hounsfield units; axis 0 runs over slices, axis 1 over image
  rows, axis 2 over image columns.
* ``spacing_mm = (dz, dy, dx)`` in array order (mm between voxel centres along each array axis).
* World coordinates are DICOM patient coordinates, LPS, given as ``(x, y, z)`` in mm.
* ``origin_mm`` is the LPS ``(x, y, z)`` position of the centre of voxel ``hu[0, 0, 0]``.
* ``direction[:, a]`` is the LPS unit vector along which array axis ``a`` (0 = z, 1 = y, 2 = x)
  increases. A standard axial scan stored with ascending z has the anti-diagonal matrix
  ``[[0, 0, 1], [0, 1, 0], [1, 0, 0]]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

AXIAL_DIRECTION = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
HU_MIN, HU_MAX = -32768, 32767


def point_text(values: Any) -> str:
    """``(12.3, -4.0, 5.5)``: a point as plain numbers for messages (not ``np.float64(...)``)."""
    return "(" + ", ".join(f"{float(v):.1f}" for v in values) + ")"


@dataclass
class CTMetadata:
    """Where a volume came from. ``source_headers`` holds one pixel-free DICOM header per slice
    (array order) when the volume was read from DICOM, so that a derived series keeps its tags."""

    patient_id: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    modality: str = "CT"
    description: str = ""
    slice_thickness_mm: float | None = None  # nominal reconstruction thickness (may differ from the z step)
    source_headers: tuple[Any, ...] | None = field(default=None, repr=False, compare=False)


@dataclass
class CTVolume:
    """A CT volume: int16 HU ``(z, y, x)`` plus spacing, origin and direction (see module doc)."""

    hu: np.ndarray
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: AXIAL_DIRECTION.copy())
    metadata: CTMetadata = field(default_factory=CTMetadata)

    def __post_init__(self) -> None:
        hu = np.asarray(self.hu)
        if hu.ndim != 3:
            raise ValueError(f"CTVolume.hu must be 3-D (z, y, x); got shape {hu.shape}")
        if hu.dtype != np.int16:
            if np.issubdtype(hu.dtype, np.floating):
                hu = np.rint(hu)
            if hu.size and (hu.min() < HU_MIN or hu.max() > HU_MAX):
                raise ValueError(f"HU values [{hu.min()}, {hu.max()}] do not fit in int16")
            hu = hu.astype(np.int16)
        self.hu = hu
        spacing = tuple(float(s) for s in self.spacing_mm)
        if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
            raise ValueError(f"spacing_mm must be three positive numbers (dz, dy, dx); got {self.spacing_mm}")
        self.spacing_mm = spacing  # type: ignore[assignment]
        origin = tuple(float(o) for o in self.origin_mm)
        if len(origin) != 3 or not all(np.isfinite(origin)):
            raise ValueError(f"origin_mm must be three finite numbers (x, y, z); got {self.origin_mm}")
        self.origin_mm = origin  # type: ignore[assignment]
        direction = np.asarray(self.direction, dtype=np.float64)
        if direction.shape != (3, 3) or not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
            raise ValueError(f"direction must be a 3x3 orthonormal matrix; got {direction.tolist()}")
        self.direction = direction

    # -- geometry -------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]

    @property
    def affine(self) -> np.ndarray:
        """4x4 matrix mapping a homogeneous array index ``(z, y, x, 1)`` to LPS ``(x, y, z, 1)`` mm."""
        affine = np.eye(4)
        affine[:3, :3] = self.direction * np.asarray(self.spacing_mm)[None, :]
        affine[:3, 3] = self.origin_mm
        return affine

    def voxel_to_world(self, index_zyx: np.ndarray | tuple[float, float, float]) -> np.ndarray:
        """Array index ``(..., 3)`` as ``(z, y, x)`` (fractional allowed) -> LPS ``(x, y, z)`` mm."""
        index = np.asarray(index_zyx, dtype=np.float64)
        return index @ self.affine[:3, :3].T + self.affine[:3, 3]

    def world_to_voxel(self, point_lps_mm: np.ndarray | tuple[float, float, float]) -> np.ndarray:
        """LPS ``(..., 3)`` as ``(x, y, z)`` mm -> fractional array index ``(z, y, x)``."""
        point = np.asarray(point_lps_mm, dtype=np.float64)
        inverse = np.linalg.inv(self.affine[:3, :3])
        return (point - self.affine[:3, 3]) @ inverse.T

    def contains_voxel(self, index_zyx: np.ndarray | tuple[float, float, float]) -> bool:
        """Whether a (fractional) array index lies inside the volume's voxel grid."""
        index = np.asarray(index_zyx, dtype=np.float64)
        return bool(np.all(index >= -0.5) and np.all(index < np.asarray(self.shape) - 0.5))

    @property
    def slice_normal(self) -> np.ndarray:
        """LPS unit vector along which slices (array axis 0) are stacked."""
        return self.direction[:, 0]

    def with_hu(self, hu: np.ndarray) -> "CTVolume":
        """A copy with a new HU array of the same shape and the same geometry and metadata."""
        if hu.shape != self.hu.shape:
            raise ValueError(f"new HU array has shape {hu.shape}, expected {self.hu.shape}")
        return replace(self, hu=hu)

    def region(self, start_zyx: tuple[int, int, int], stop_zyx: tuple[int, int, int]) -> "CTVolume":
        """The voxels ``[start, stop)`` per axis as a volume of their own, placed where they lie in the
        world (same spacing and direction, origin at voxel ``start``)."""
        start = np.asarray(start_zyx, int)
        stop = np.asarray(stop_zyx, int)
        if (
            start.shape != (3,)
            or stop.shape != (3,)
            or np.any(start < 0)
            or np.any(stop > self.shape)
            or np.any(stop <= start)
        ):
            raise ValueError(
                f"region {tuple(start)}..{tuple(stop)} is empty or outside a volume of shape {self.shape}"
            )
        hu = self.hu[start[0] : stop[0], start[1] : stop[1], start[2] : stop[2]]
        return replace(self, hu=np.ascontiguousarray(hu), origin_mm=tuple(self.voxel_to_world(start)))

    def __repr__(self) -> str:
        return (
            f"CTVolume(shape={self.shape}, spacing_mm={tuple(round(s, 4) for s in self.spacing_mm)}, "
            f"origin_mm={tuple(round(o, 2) for o in self.origin_mm)}, "
            f"hu=[{int(self.hu.min()) if self.hu.size else 0}, {int(self.hu.max()) if self.hu.size else 0}], "
            f"series={self.metadata.series_instance_uid or '-'})"
        )
