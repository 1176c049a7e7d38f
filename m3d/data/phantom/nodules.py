"""Real LIDC nodules in the phantom: their contours moved to a site inside the lung (`place_nodule`) and
their consensus mask painted from the readers' ratings (`paint_nodule`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from ..lidc import Annotation, ContourROI, LIDCScan, Nodule, group_nodules
from .chest import Chest
from .constants import CALCIFICATION_HU, GROUND_GLASS_HU, SOLID_FRACTION_BY_TEXTURE, SOLID_NODULE_HU
from .grid import Grid
from .sources import SourceNodule

HILUM_CLEARANCE_MM = 25.0  # a nodule's edge stays this far from the hila
MAX_BRIGHT_FRACTION = 0.15  # of the nodule's voxels on vessels or walls (> -400 HU) where it is put


@dataclass
class PlacedNodule:
    """A source nodule moved into the phantom: its number (``P<number>`` in the annotations' ids) and its
    transplanted annotations."""

    number: int
    source: SourceNodule
    annotations: list[Annotation]


def _majority(values: list[int], default: int) -> int:
    if not values:
        return default
    counts = np.bincount(np.asarray(values, dtype=int))
    return int(np.argmax(counts))


def _nodule_ratings(annotations: Sequence[Annotation]) -> dict[str, int]:
    """The readers' texture (median), calcification and internal structure (majority) of a nodule."""

    def collect(name: str) -> list[int]:
        return [int(a.characteristics[name]) for a in annotations if name in (a.characteristics or {})]

    texture = collect("texture")
    return {
        "texture": int(np.clip(np.rint(np.median(texture)), 1, 5)) if texture else 5,
        "calcification": _majority(collect("calcification"), 6),
        "internalStructure": _majority(collect("internalStructure"), 1),
    }


def _transplant(
    source: SourceNodule,
    site_kyx: tuple[int, float, float],
    z_target: np.ndarray,
    pixel_target: float,
    number: int,
) -> list[Annotation]:
    """Copies of the source annotations moved to ``site`` (slice index, row, column) of the target grid.

    Pixel offsets from the nodule centre are rescaled by the pixel-spacing ratio (the nodule keeps its
    size in mm); each contour slice goes to the target slice at the same z offset (nearest slice; when
    several source slices land on one target slice, the closest one is kept).
    """
    ratio = float(source.scan.pixel_spacing_mm) / pixel_target
    outline_points = np.concatenate(
        [np.asarray(r.points_xy_px, float) for a in source.annotations for r in a.rois if r.inclusion]
    )
    centre_col, centre_row = 0.5 * (outline_points.min(axis=0) + outline_points.max(axis=0))
    roi_z = np.array([r.z_mm for a in source.annotations for r in a.rois])
    centre_z = 0.5 * (roi_z.min() + roi_z.max())
    site_k, site_row, site_col = site_kyx
    step = float(np.median(np.diff(z_target))) if len(z_target) > 1 else 1.0
    site_z = z_target[0] + site_k * step
    out = []
    for reader_index, annotation in enumerate(source.annotations):
        rois_by_z: dict[float, list[ContourROI]] = {}
        for roi in annotation.rois:
            rois_by_z.setdefault(round(float(roi.z_mm), 4), []).append(roi)
        chosen: dict[int, tuple[float, float]] = {}  # target slice -> (source z, residual)
        for source_z in rois_by_z:
            exact = site_z + (source_z - centre_z)
            k = int(np.rint((exact - z_target[0]) / step))
            if not 0 <= k < len(z_target):
                continue
            residual = abs(exact - z_target[k])
            if k not in chosen or residual < chosen[k][1]:
                chosen[k] = (source_z, residual)
        rois = []
        for k, (source_z, _) in sorted(chosen.items()):
            for roi in rois_by_z[source_z]:
                points = np.asarray(roi.points_xy_px, float)
                moved = np.empty_like(points)
                moved[:, 0] = site_col + (points[:, 0] - centre_col) * ratio
                moved[:, 1] = site_row + (points[:, 1] - centre_row) * ratio
                rois.append(ContourROI(float(z_target[k]), np.round(moved, 3), bool(roi.inclusion)))
        if not rois:
            continue
        reader = annotation.reader or f"reader-{reader_index}"
        out.append(
            Annotation(
                f"P{number}R{reader_index}-{annotation.nodule_id}", reader, rois, dict(annotation.characteristics)
            )
        )
    return out


def _union_mask(
    annotations: list[Annotation], z_target: np.ndarray, pixel: float, thickness: float, shape: tuple[int, int, int]
) -> np.ndarray:
    """Union of the readers' masks of transplanted annotations on a small grid (rows, columns = shape)."""
    scan = LIDCScan("", "", "", thickness, pixel, z_target, list(annotations), rows=shape[1], columns=shape[2])
    nodule = Nodule.from_annotations(annotations, scan)
    return np.asarray(nodule.mask(shape, consensus=1.0 / len(annotations)), dtype=bool)


def _place_nodule(
    source: SourceNodule,
    rng: np.random.Generator,
    lung: np.ndarray,
    anatomy_hu: np.ndarray,
    z_target: np.ndarray,
    pixel: float,
    others: list[tuple[np.ndarray, float]],
    hila_kyx: np.ndarray,
    number: int,
    thickness: float,
    tries: int = 300,
) -> list[Annotation] | None:
    """Transplanted annotations at a random site where the nodule fits inside the lung, away from the hila
    and from the ``others`` placed so far (``(centre mm, radius mm)``, appended to), or None."""
    nz, ny, nx = lung.shape
    step = float(np.median(np.diff(z_target))) if len(z_target) > 1 else 1.0
    # rasterise once around a local centre, then test shifted copies of the voxel list
    half_xy = int(math.ceil(0.5 * source.diameter_mm / pixel * 1.6)) + 4
    roi_z = np.array([r.z_mm for a in source.annotations for r in a.rois])
    half_z = int(math.ceil(0.5 * (np.ptp(roi_z) if len(roi_z) else 0) / step)) + 2
    box = (2 * half_z + 1, 2 * half_xy + 1, 2 * half_xy + 1)
    if box[0] > nz or box[1] > ny or box[2] > nx:
        return None
    local_z = z_target[0] + step * np.arange(box[0])
    local = _transplant(source, (half_z, half_xy, half_xy), local_z, pixel, number)
    if not local:
        return None
    union = _union_mask(local, local_z, pixel, thickness, box)
    if not union.any():
        return None
    cross = ndimage.generate_binary_structure(3, 1)
    grown = ndimage.binary_dilation(union, structure=cross[1:2], iterations=2)
    grown = ndimage.binary_dilation(grown, structure=cross[:, 1:2, 1:2])
    grown_z, grown_y, grown_x = np.nonzero(grown)
    union_z, union_y, union_x = np.nonzero(union)
    offsets_mm = np.stack(
        [(union_z - half_z) * step, (union_y - half_xy) * pixel, (union_x - half_xy) * pixel], axis=1
    )
    radius_mm = float(np.sqrt((offsets_mm**2).sum(axis=1)).max()) + pixel
    first_k, last_k = half_z, nz - box[0] + half_z
    if last_k < first_k:
        return None
    candidates = np.flatnonzero(lung[first_k : last_k + 1].reshape(-1))
    if not len(candidates):
        return None
    for _ in range(tries):
        flat = int(candidates[rng.integers(len(candidates))])
        k = first_k + flat // (ny * nx)
        row, col = divmod(flat % (ny * nx), nx)
        shift_z, shift_y, shift_x = k - half_z, row - half_xy, col - half_xy
        at_z, at_y, at_x = grown_z + shift_z, grown_y + shift_y, grown_x + shift_x
        if (
            at_z.min() < 0
            or at_y.min() < 0
            or at_x.min() < 0
            or at_z.max() >= nz
            or at_y.max() >= ny
            or at_x.max() >= nx
        ):
            continue
        if not lung[at_z, at_y, at_x].all():
            continue
        centre_mm = np.array([k * step, row * pixel, col * pixel])
        # keep clear of the hila and of other nodules (and beyond the readers-grouping tolerance)
        if len(hila_kyx):
            distances = np.sqrt((((hila_kyx - [k, row, col]) * [step, pixel, pixel]) ** 2).sum(axis=1))
            if np.min(distances) < HILUM_CLEARANCE_MM + radius_mm:
                continue
        if any(
            np.linalg.norm(centre_mm - other_centre) < radius_mm + other_radius + thickness + 3.0
            for other_centre, other_radius in others
        ):
            continue
        bright = anatomy_hu[union_z + shift_z, union_y + shift_y, union_x + shift_x] > -400
        if bright.mean() > MAX_BRIGHT_FRACTION:
            continue
        others.append((centre_mm, radius_mm))
        return _transplant(source, (k, row, col), z_target, pixel, number)
    return None


def _paint_nodule(
    hu: np.ndarray,
    mask: np.ndarray,
    ratings: dict[str, int],
    rng: np.random.Generator,
    spacing: tuple[float, float, float],
) -> None:
    """Paint one nodule (consensus mask, full volume) into ``hu`` (float32, in place): solid core and
    ground-glass rim by texture, calcification pattern, fat or air inside, a soft edge and heterogeneity."""
    voxels = np.nonzero(mask)
    if not len(voxels[0]):
        return
    pad = 3
    low = [max(int(index.min()) - pad, 0) for index in voxels]
    high = [min(int(index.max()) + pad + 1, extent) for index, extent in zip(voxels, mask.shape)]
    box = tuple(slice(start, stop) for start, stop in zip(low, high))
    local = mask[box]
    dz, dy, dx = spacing
    sigma_xy = max(0.35, 0.45 / dy)
    alpha = ndimage.gaussian_filter(local.astype(np.float32), (0.0, sigma_xy, sigma_xy))
    depth = ndimage.distance_transform_edt(local, sampling=(dz, dy, dx)).astype(np.float32)
    depth_fraction = depth / max(float(depth.max()), 1e-3)
    texture = ratings["texture"]
    solid_hu = rng.uniform(*SOLID_NODULE_HU)
    ground_glass_hu = rng.uniform(*GROUND_GLASS_HU)
    core_fraction = SOLID_FRACTION_BY_TEXTURE[texture]
    if core_fraction >= 1.0:
        solid = np.ones_like(depth_fraction)
    elif core_fraction <= 0.0:
        solid = np.zeros_like(depth_fraction)
    else:
        solid = 1.0 / (1.0 + np.exp(-(depth_fraction - (1.0 - core_fraction)) / 0.06))
    # internal heterogeneity: smooth noise, stronger in ground glass
    noise = ndimage.gaussian_filter(rng.standard_normal(local.shape).astype(np.float32), (0.5, 1.2, 1.2))
    noise /= float(noise.std() + 1e-6)
    nodule_hu = ground_glass_hu + (solid_hu - ground_glass_hu) * solid + (10.0 * solid + 35.0 * (1.0 - solid)) * noise
    # a slightly lower-density rim on solid nodules (partial volume of the surface)
    nodule_hu -= 60.0 * solid * np.clip(1.0 - depth / (1.2 * max(dy, 0.6)), 0.0, 1.0)
    calcification = ratings["calcification"]
    if calcification in (1, 2, 3, 4, 5) and local.sum() >= 4:
        calcification_hu = rng.uniform(*CALCIFICATION_HU)
        pattern = np.zeros_like(depth_fraction)
        if calcification == 3:  # solid: the whole nodule
            pattern = np.clip((depth_fraction - 0.05) / 0.15, 0.0, 1.0)
        elif calcification == 5:  # central
            pattern = np.clip((depth_fraction - (1.0 - rng.uniform(0.3, 0.5))) / 0.1, 0.0, 1.0)
        elif calcification == 2:  # laminated: concentric shells
            pattern = (np.cos(depth_fraction * np.pi * rng.uniform(3.0, 5.0)) > 0.6) * (depth_fraction > 0.25)
        else:  # popcorn (1) or non-central (4): a few blobs
            inside = np.argwhere(depth_fraction > (0.3 if calcification == 1 else 0.15))
            n_blobs = int(rng.integers(3, 7)) if calcification == 1 else 1
            zz, yy, xx = np.indices(local.shape)
            for _ in range(min(n_blobs, len(inside))):
                blob_z, blob_y, blob_x = inside[rng.integers(len(inside))]
                blob_radius = rng.uniform(0.8, 1.8) * max(dy, 0.7) * (1.0 if calcification == 1 else 1.6)
                distance2 = ((zz - blob_z) * dz) ** 2 + ((yy - blob_y) * dy) ** 2 + ((xx - blob_x) * dx) ** 2
                pattern = np.maximum(pattern, np.clip(1.5 - np.sqrt(distance2) / blob_radius, 0.0, 1.0))
        nodule_hu = nodule_hu + pattern * (calcification_hu - nodule_hu)
    internal = ratings["internalStructure"]
    if internal in (3, 4) and depth_fraction.max() > 0:  # fat or air near the centre
        pocket = np.clip((depth_fraction - 0.7) / 0.1, 0.0, 1.0)
        nodule_hu = nodule_hu + pocket * ((-90.0 if internal == 3 else -900.0) - nodule_hu)
    background = hu[box]
    background += alpha * np.maximum(nodule_hu - background, 0.0) + alpha * np.minimum(nodule_hu - background, 0.0) * (
        nodule_hu < -500
    )


def transplant_nodules(
    pool: list[SourceNodule], rng: np.random.Generator, chest: Chest, grid: Grid, n_wanted: int
) -> list[PlacedNodule]:
    """Up to ``n_wanted`` nodules of ``pool``, in order, each at a random site of the chest where it fits."""
    pixel, step = grid.pixel_spacing, grid.slice_step
    hila_kyx = np.array(
        [
            [(h[2] - grid.z_mm[0]) / step, (h[1] - grid.y_mm[0]) / pixel, (h[0] - grid.x_mm[0]) / pixel]
            for h in chest.hila
        ]
    )
    others: list[tuple[np.ndarray, float]] = []
    placed: list[PlacedNodule] = []
    for source in pool:
        if len(placed) >= n_wanted:
            break
        number = len(placed)
        moved = _place_nodule(
            source, rng, chest.lung_mask, chest.hu, grid.z_mm, pixel, others, hila_kyx, number, grid.thickness
        )
        if moved is not None:
            placed.append(PlacedNodule(number, source, moved))
    return placed


def paint_nodules(
    scan: LIDCScan, placed: list[PlacedNodule], hu: np.ndarray, grid: Grid, rng: np.random.Generator
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Paint the 50 % consensus mask of each of the phantom's own nodules (``scan`` holds the transplanted
    annotations) into ``hu``; returns the union of the masks and one record per placed nodule."""
    pixel = grid.pixel_spacing
    nodule_mask = np.zeros(grid.shape, dtype=bool)
    records = []
    by_number = {p.number: p for p in placed}
    for nodule in group_nodules(scan):
        numbers = sorted({int(a.nodule_id.split("R", 1)[0][1:]) for a in nodule.annotations})
        mask = np.asarray(nodule.mask(grid.shape, consensus=0.5), dtype=bool)
        ratings = _nodule_ratings(nodule.annotations)
        if mask.any():
            _paint_nodule(hu, mask, ratings, rng, (grid.slice_step, pixel, pixel))
            nodule_mask |= mask
        for number in numbers:
            source = by_number[number].source
            centre_z, centre_y, centre_x = (float(v) for v in nodule.centroid_zyx)
            records.append(
                {
                    "number": number,
                    "source_series_uid": source.scan.series_instance_uid,
                    "source_patient_id": source.scan.patient_id,
                    "source_nodule_index": source.index,
                    "source_diameter_mm": round(source.diameter_mm, 3),
                    "n_readers": len(by_number[number].annotations),
                    "centre_zyx": [round(centre_z, 2), round(centre_y, 2), round(centre_x, 2)],
                    "malignancy": [a.characteristics.get("malignancy") for a in by_number[number].annotations],
                    **ratings,
                }
            )
    records.sort(key=lambda r: r["number"])
    return nodule_mask, records
