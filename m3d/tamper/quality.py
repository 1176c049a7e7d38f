"""The builder's quality check: measure the nodule at the centre of a generated 1 mm cube and decide
whether the tampering result is kept.

Measurement (`measure_nodule`): voxels above ``threshold_hu`` (-400 HU: solid tissue, not lung
parenchyma) inside the generator's centre hole (the 20^3 region it filled), opened with a 6-connected
structuring element so that thin vessels touching the nodule are cut off, then the 26-connected
component(s) reaching the central ball of radius ``center_radius_mm``. Its size is the equivalent
diameter ``(6 V / pi)^(1/3)`` (the sphere of the same volume, V in mm^3), with its mean HU. An injected nodule is
measured without the site's chest wall (`chest_wall` of the pristine cube), as a radiologist measures a
juxtapleural nodule without the pleura: with it, a nodule grown against the wall took in wall and bone, measured
17-19 mm where the nodule alone was 9-10 mm, and its mean HU was the wall's.

Rule (`QualityCriteria`, the M3Dsynth targets): an **injection** is kept if the grown nodule is larger
than 10 mm (a fake malignant nodule); a **removal** is kept if what remains at the site is smaller than
8 mm (nothing, or a fake benign nodule). Results that fail are dropped from the dataset; the pristine
scan of the site is kept either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .cube import CUBE_SPACING_MM, HOLE_SIZE, hole_mask

_OPENING = ndimage.generate_binary_structure(3, 1)
_CONNECTIVITY = ndimage.generate_binary_structure(3, 3)


@dataclass(frozen=True)
class QualityCriteria:
    """Thresholds of the keep/drop rule (see the module docstring)."""

    threshold_hu: float = -400.0
    center_radius_mm: float = 3.0
    chest_wall_min_hu: float = -300.0  # chest wall, mediastinum, diaphragm: soft tissue and bone
    chest_wall_opening_mm: float = 3.0  # tissue thicker than a ball of this radius is wall, not a vessel
    inject_min_diameter_mm: float = 10.0
    remove_max_diameter_mm: float = 8.0


@dataclass(frozen=True)
class NoduleMeasurement:
    """The nodule at a cube's centre: equivalent diameter (mm; 0 if none), volume (mm^3) and mean HU
    (NaN if none)."""

    diameter_mm: float
    volume_mm3: float
    mean_hu: float


@dataclass(frozen=True)
class QualityResult:
    """The measurement, whether the result is kept, and why (one line)."""

    measurement: NoduleMeasurement
    kept: bool
    reason: str


def distance_from_centre_mm(shape: tuple[int, ...], spacing_mm: float = CUBE_SPACING_MM) -> np.ndarray:
    """Distance (mm) of each voxel of an isotropic grid of ``shape`` from the grid's centre."""
    grid = np.indices(shape).astype(np.float32)
    centre = (np.asarray(shape, np.float32) - 1) / 2
    return np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0)) * spacing_mm


def central_component(solid: np.ndarray, center_radius_mm: float, spacing_mm: float = CUBE_SPACING_MM) -> np.ndarray:
    """The nodule in a bool mask of solid voxels: ``solid`` opened with the 6-connected cross (cuts thin
    vessels off), then its 26-connected components that reach the central ball of ``center_radius_mm``."""
    labels, _ = ndimage.label(ndimage.binary_opening(solid, structure=_OPENING), structure=_CONNECTIVITY)
    central = np.unique(labels[(distance_from_centre_mm(solid.shape, spacing_mm) <= center_radius_mm) & (labels > 0)])
    return np.isin(labels, central) if central.size else np.zeros(solid.shape, bool)


def ball_structure(radius_voxels: int) -> np.ndarray:
    """The bool ball of ``radius_voxels`` (a ``2 r + 1`` cube), a structuring element for morphology."""
    offsets = np.indices((2 * radius_voxels + 1,) * 3) - radius_voxels
    return (offsets**2).sum(0) <= radius_voxels**2


def thick_tissue(
    cube_hu: np.ndarray, criteria: QualityCriteria = QualityCriteria(), spacing_mm: float = CUBE_SPACING_MM
) -> np.ndarray:
    """Tissue above ``criteria.chest_wall_min_hu`` thicker than a ball of ``criteria.chest_wall_opening_mm``
    (vessels are thinner)."""
    radius = int(round(criteria.chest_wall_opening_mm / spacing_mm))
    return ndimage.binary_opening(np.asarray(cube_hu) > criteria.chest_wall_min_hu, structure=ball_structure(radius))


def chest_wall(
    cube_hu: np.ndarray, criteria: QualityCriteria = QualityCriteria(), spacing_mm: float = CUBE_SPACING_MM
) -> np.ndarray:
    """The cube's chest wall (with mediastinum and diaphragm): its `thick_tissue` that reaches the cube's faces,
    grown by one voxel (the partial-volume rim)."""
    thick, _ = ndimage.label(thick_tissue(cube_hu, criteria, spacing_mm))
    faces = np.unique(np.concatenate([np.moveaxis(thick, axis, 0)[[0, -1]].ravel() for axis in range(3)]))
    return ndimage.binary_dilation(np.isin(thick, faces[faces > 0]))


def nodule_mask(
    cube_hu: np.ndarray,
    criteria: QualityCriteria = QualityCriteria(),
    spacing_mm: float = CUBE_SPACING_MM,
    leave_out: np.ndarray | None = None,
) -> np.ndarray:
    """The voxels of the nodule at the centre of a cube of HU (any cubic shape, isotropic ``spacing_mm``), as
    `measure_nodule` measures it: the `central_component` of the voxels above ``criteria.threshold_hu`` inside the
    centre hole (``HOLE_SIZE``^3 voxels, or the whole cube when it is smaller), less ``leave_out`` (bool, the
    cube's shape: e.g. the site's `chest_wall`)."""
    hu = np.asarray(cube_hu, np.float32)
    if hu.ndim != 3 or len(set(hu.shape)) != 1:
        raise ValueError(f"cube_hu must be a cubic 3-D array; got shape {hu.shape}")
    solid = (hu > criteria.threshold_hu) & hole_mask(hu.shape, min(HOLE_SIZE, hu.shape[0]))
    if leave_out is not None:
        if np.shape(leave_out) != hu.shape:
            raise ValueError(f"leave_out must have the cube's shape {hu.shape}; got {np.shape(leave_out)}")
        solid &= ~np.asarray(leave_out, bool)
    return central_component(solid, criteria.center_radius_mm, spacing_mm)


def equivalent_diameter_mm(masks: np.ndarray, spacing_mm: float = CUBE_SPACING_MM) -> np.ndarray:
    """The diameter (mm) of the sphere of each mask's volume, ``(6 V / pi)^(1/3)``; ``masks`` ``(N, ...)`` bool."""
    volumes = np.asarray(masks, bool).reshape(len(masks), -1).sum(1) * spacing_mm**3
    return (6 * volumes / np.pi) ** (1 / 3)


def measure_nodule(
    cube_hu: np.ndarray,
    criteria: QualityCriteria = QualityCriteria(),
    spacing_mm: float = CUBE_SPACING_MM,
    leave_out: np.ndarray | None = None,
) -> NoduleMeasurement:
    """Measure the nodule at the centre of a cube of HU (any cubic shape, isotropic ``spacing_mm``;
    the generator's centre hole is ``HOLE_SIZE``^3 voxels when the cube is the 32^3 tamper cube), without the
    voxels of ``leave_out`` (see `nodule_mask`)."""
    hu = np.asarray(cube_hu, np.float32)
    nodule = nodule_mask(hu, criteria, spacing_mm, leave_out)
    volume_mm3 = float(nodule.sum()) * spacing_mm**3
    return NoduleMeasurement(
        diameter_mm=float(equivalent_diameter_mm(nodule[None], spacing_mm)[0]),
        volume_mm3=volume_mm3,
        mean_hu=float(hu[nodule].mean()) if nodule.any() else float("nan"),
    )


def check_quality(
    cube_hu: np.ndarray,
    task: str,
    criteria: QualityCriteria = QualityCriteria(),
    spacing_mm: float = CUBE_SPACING_MM,
    pristine_hu: np.ndarray | None = None,
) -> QualityResult:
    """Measure the generated cube and apply the keep/drop rule of ``task`` ("inject" | "remove"). For an
    injection, ``pristine_hu`` (the site's cube before tampering) gives the chest wall left out of the
    measurement (`chest_wall`). A removal is measured whole: the nodule to remove may be merged with the wall in
    the pristine cube, and leaving the wall out would leave it out too."""
    leave_out = None
    if task == "inject" and pristine_hu is not None:
        if np.shape(pristine_hu) != np.shape(cube_hu):
            raise ValueError(f"pristine_hu must have cube_hu's shape {np.shape(cube_hu)}; got {np.shape(pristine_hu)}")
        leave_out = chest_wall(pristine_hu, criteria, spacing_mm)
    measurement = measure_nodule(cube_hu, criteria, spacing_mm, leave_out)
    diameter = measurement.diameter_mm
    kept = bool(passes_keep_rule(diameter, task, criteria))
    if task == "inject":
        reason = f"grown nodule {diameter:.1f} mm {'>' if kept else '<='} {criteria.inject_min_diameter_mm:g} mm"
    else:
        reason = f"remaining nodule {diameter:.1f} mm {'<' if kept else '>='} {criteria.remove_max_diameter_mm:g} mm"
    return QualityResult(measurement=measurement, kept=kept, reason=reason)


def passes_keep_rule(
    diameter_mm: float | np.ndarray, task: str, criteria: QualityCriteria = QualityCriteria()
) -> bool | np.ndarray:
    """Whether a nodule of ``diameter_mm`` (one value or an array) passes ``task``'s keep rule: an injected nodule
    larger than ``inject_min_diameter_mm``, what a removal leaves smaller than ``remove_max_diameter_mm``."""
    if task == "inject":
        return np.asarray(diameter_mm) > criteria.inject_min_diameter_mm
    if task == "remove":
        return np.asarray(diameter_mm) < criteria.remove_max_diameter_mm
    raise ValueError(f"task must be 'inject' or 'remove'; got {task!r}")


__all__ = [
    "NoduleMeasurement",
    "QualityCriteria",
    "QualityResult",
    "ball_structure",
    "check_quality",
    "chest_wall",
    "equivalent_diameter_mm",
    "measure_nodule",
    "nodule_mask",
    "passes_keep_rule",
    "thick_tissue",
]
