"""The phantom's voxel grid in mm and the partial-volume compositing of a tissue over what is there."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Grid:
    """Voxel centres: ``x_mm`` (columns) and ``y_mm`` (rows) relative to the field-of-view centre, ``z_mm``
    the slices' DICOM z, and the slice thickness (mm, for partial volume along z)."""

    x_mm: np.ndarray
    y_mm: np.ndarray
    z_mm: np.ndarray
    thickness: float

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.z_mm), len(self.y_mm), len(self.x_mm))

    @property
    def pixel_spacing(self) -> float:
        return float(abs(self.x_mm[1] - self.x_mm[0])) if len(self.x_mm) > 1 else 1.0

    @property
    def slice_step(self) -> float:
        return float(np.median(np.diff(self.z_mm))) if len(self.z_mm) > 1 else self.thickness


def index_range(coords: np.ndarray, low: float, high: float) -> tuple[int, int]:
    """``start, stop`` of the sorted ``coords`` within ``[low, high]``."""
    return int(np.searchsorted(coords, low, "left")), int(np.searchsorted(coords, high, "right"))


def ramp(signed_distance: np.ndarray | float, width: float) -> np.ndarray:
    """Partial-volume occupancy of a boundary: 1 well inside (negative distance), 0 well outside."""
    out = np.multiply(signed_distance, np.float32(-1.0 / width), dtype=np.float32)
    out += np.float32(0.5)
    return np.clip(out, 0.0, 1.0, out=out)


def lerp(hu: np.ndarray, alpha: np.ndarray, value: np.ndarray | float) -> None:
    """``hu += alpha * (value - hu)`` in place (alpha-compositing of a tissue over what is there)."""
    delta = value - hu
    delta *= alpha
    hu += delta


def lerp_at(hu: np.ndarray, flat_index: np.ndarray, alpha: np.ndarray, value: np.ndarray | float) -> None:
    """`lerp` on the pixels ``flat_index`` of a 2-D plane."""
    view = hu.reshape(-1)
    current = view[flat_index]
    view[flat_index] = current + alpha * (value - current)
