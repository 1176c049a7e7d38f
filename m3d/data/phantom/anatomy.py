"""The patient: body size, wall layers, ribs, spine, diaphragm, heart and tissue values drawn from a seed
(`sample_anatomy`), and the landmark helpers the rest of the phantom is written with.

Coordinates: ``X`` (mm, patient left +, image columns), ``Y`` (mm, posterior +, image rows), both relative
to the centre of the field of view, and ``Z`` = DICOM z (mm, superior +). Anatomical height is
``s = (z_apex - Z) / length``: 0 at the lung apex, 1 at the deepest diaphragm recess.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .constants import (
    APEX_HEIGHT_S,
    APEX_MARGIN_MM,
    BASE_MARGIN_MM,
    BLOOD_HU,
    BODY_SIZE_PERIOD_MM,
    BODY_SIZE_VARIATION,
    BREAST_MM,
    BREAST_PROBABILITY,
    CAVITY_CENTRE_Y_MM,
    CAVITY_DEPTH_RATIO,
    CAVITY_HALF_WIDTH_MM,
    CAVITY_OUTLINE_WOBBLE,
    CHEST_WALL_MUSCLE_MM,
    CONTRAST_BLOOD_HU,
    CONTRAST_PROBABILITY,
    DISC_FRACTION,
    DOME_HALF_DEPTH_MM,
    DOME_HALF_WIDTH_MM,
    DOME_Y_OFFSET_MM,
    FAT_HU,
    FIRST_RIB_S,
    FISSURE_VISIBILITY,
    HEART_AXIS_ANGLE_DEG,
    HEART_CENTRE_S,
    HEART_CENTRE_X_MM,
    HEART_DEPTH_FRACTION,
    HEART_HALF_HEIGHT_S,
    HEART_HALF_LENGTH_MM,
    HEART_HALF_WIDTH_MM,
    HEART_TOP_S,
    HORIZONTAL_FISSURE_S,
    LEFT_DOME_TOP_S,
    LEFT_DOME_X_MM,
    LEFT_OBLIQUE_FISSURE_S,
    LIVER_HU,
    LUNG_DEPENDENT_GRADIENT_HU,
    LUNG_HU,
    LUNG_LENGTH_MM,
    LUNG_TEXTURE_HU,
    MUSCLE_HU,
    NOISE_GRAIN_MM,
    NOMINAL_CAVITY_HALF_AXES_MM,
    PERICARDIAL_FAT_MM,
    POSTERIOR_FAT_EXCESS,
    RIB_ANTERIOR_DROP_S,
    RIB_HEIGHT_MM,
    RIB_JITTER_S,
    RIB_SPACING_S,
    RIB_THICKNESS_MM,
    RIGHT_DOME_TOP_S,
    RIGHT_DOME_X_MM,
    RIGHT_OBLIQUE_FISSURE_S,
    SCANNER_NOISE_HU,
    STOMACH_AIR,
    SUBCUTANEOUS_FAT_GAMMA,
    SUBCUTANEOUS_FAT_MM,
    TABLE_GAP_MM,
    TABLE_PROBABILITY,
    VERTEBRA_RADIUS_MM,
)


@dataclass
class Heart:
    """An ellipsoid in the nominal frame: centre ``centre_x`` (mm) and ``depth_fraction`` (from the
    anterior wall to the vertebral front), centre and half-height in anatomical height ``s``, in-plane
    semi-axes rotated by ``angle`` (radians), and the pericardial fat around it."""

    centre_x: float
    depth_fraction: float
    centre_s: float
    half_length: float
    half_width: float
    half_height_s: float
    angle: float
    fat_mm: float


@dataclass
class Anatomy:
    """One patient's anatomical parameters (mm unless noted; ``_s`` values are anatomical heights)."""

    z_apex: float
    length: float  # apex -> deepest diaphragm recess (mm)
    scale_x: float  # lateral scale of the landmarks (cavity half-width / nominal)
    scale_y: float  # antero-posterior scale
    cavity_centre_y: float
    cavity_half_width: float
    cavity_half_depth: float
    cavity_fourier: np.ndarray  # (k, amplitude, phase) rows
    fat_mm: float  # subcutaneous fat
    posterior_fat: float  # extra fat over the back (fraction)
    breast_mm: float
    muscle_mm: float  # chest-wall muscle
    rib_thickness: float
    rib_height: float
    first_rib_s: float
    rib_spacing_s: float
    rib_drop_s: float  # a rib's drop from back to front
    rib_jitter: np.ndarray  # per rib (side, k): small s offsets
    vertebra_radius: float
    disc_fraction: float
    spine_phase: float
    right_dome: tuple[float, float, float]  # s of the dome top, X, Y offset
    left_dome: tuple[float, float, float]
    dome_half_width: float
    dome_half_depth: float
    apex_height_s: float
    heart: Heart
    lung_hu: float
    lung_gradient: float
    lung_texture: float
    fat_hu: float
    muscle_hu: float
    liver_hu: float
    blood_hu: float
    contrast: bool
    noise_sigma: float
    noise_corr_mm: float
    table: bool
    table_gap: float
    fissure_visibility: float
    fissure_planes: dict
    z_variation: np.ndarray  # (amplitude, period, phase) of slow body-size variation with z
    stomach_air: float

    # -- landmark helpers --------------------------------------------------------------------------
    def z_of(self, s: float | np.ndarray) -> float | np.ndarray:
        return self.z_apex - np.asarray(s) * self.length

    def s_of(self, z: float | np.ndarray) -> float | np.ndarray:
        return (self.z_apex - np.asarray(z)) / self.length

    @property
    def y_front(self) -> float:
        """Y of the anterior cavity boundary."""
        return self.cavity_centre_y - self.cavity_half_depth

    @property
    def y_vertebra(self) -> float:
        """Y of the vertebral body centre."""
        return self.cavity_centre_y + self.cavity_half_depth - 1.1 * self.vertebra_radius - 9.0 * self.scale_y

    @property
    def y_vertebra_front(self) -> float:
        return self.y_vertebra - self.vertebra_radius

    def y_at(self, fraction: float) -> float:
        """Y at a fraction of the way from the anterior cavity wall (0) to the vertebral front (1)."""
        return self.y_front + fraction * (self.y_vertebra_front - self.y_front)

    def point(self, x_nominal: float, fraction: float, s: float) -> tuple[float, float, float]:
        """A landmark: nominal X (scaled to this patient), depth fraction (`y_at`) and height ``s``."""
        return (x_nominal * self.scale_x, self.y_at(fraction), float(self.z_of(s)))


def sample_anatomy(rng: np.random.Generator, z_low: float, z_high: float, fov_mm: float) -> Anatomy:
    """A patient whose lungs fit the scan's z range ``z_low .. z_high`` and whose body fits the field of view."""
    uniform = rng.uniform
    extent = z_high - z_low
    top_margin = uniform(*APEX_MARGIN_MM)
    bottom_margin = uniform(*BASE_MARGIN_MM)
    length = extent - top_margin - bottom_margin
    # real lungs are 220-300 mm long; scans that cover less show only part of the chest
    if length < 200.0:
        length = max(length, min(240.0, extent * 0.9))
    length = float(np.clip(length, *LUNG_LENGTH_MM))
    z_apex = z_high - top_margin if extent - top_margin >= length * 0.6 else z_high + 10.0
    # body size: the cavity plus its wall (ribs, muscle, fat) must fit in the field of view
    half_width = uniform(*CAVITY_HALF_WIDTH_MM)
    half_depth = half_width * uniform(*CAVITY_DEPTH_RATIO)
    fat = float(np.clip(rng.gamma(*SUBCUTANEOUS_FAT_GAMMA), *SUBCUTANEOUS_FAT_MM))
    body_half_width = half_width + 10 + 14 + fat * 1.3
    fit = min(1.0, 0.47 * fov_mm / body_half_width)
    half_width *= fit
    half_depth *= fit
    fat *= fit
    nominal_half_width, nominal_half_depth = NOMINAL_CAVITY_HALF_AXES_MM
    scale_x, scale_y = half_width / nominal_half_width, half_depth / nominal_half_depth
    harmonics = np.arange(2, 7)
    fourier = np.stack(
        [harmonics, rng.normal(0, CAVITY_OUTLINE_WOBBLE, 5) / np.arange(1, 6) ** 0.5, uniform(0, 2 * np.pi, 5)],
        axis=1,
    )
    heart = Heart(
        centre_x=uniform(*HEART_CENTRE_X_MM) * scale_x,
        depth_fraction=uniform(*HEART_DEPTH_FRACTION),
        centre_s=uniform(*HEART_CENTRE_S),
        half_length=uniform(*HEART_HALF_LENGTH_MM) * scale_x,
        half_width=uniform(*HEART_HALF_WIDTH_MM) * scale_y,
        half_height_s=uniform(*HEART_HALF_HEIGHT_S),
        angle=math.radians(uniform(*HEART_AXIS_ANGLE_DEG)),
        fat_mm=uniform(*PERICARDIAL_FAT_MM),
    )
    contrast = bool(rng.random() < CONTRAST_PROBABILITY)
    rib_spacing_s = uniform(*RIB_SPACING_S)
    anatomy = Anatomy(
        z_apex=float(z_apex),
        length=length,
        scale_x=scale_x,
        scale_y=scale_y,
        cavity_centre_y=uniform(*CAVITY_CENTRE_Y_MM),
        cavity_half_width=half_width,
        cavity_half_depth=half_depth,
        cavity_fourier=fourier,
        fat_mm=fat,
        posterior_fat=uniform(*POSTERIOR_FAT_EXCESS),
        breast_mm=float(uniform(*BREAST_MM) if rng.random() < BREAST_PROBABILITY else 0.0) * fit,
        muscle_mm=uniform(*CHEST_WALL_MUSCLE_MM) * fit,
        rib_thickness=uniform(*RIB_THICKNESS_MM),
        rib_height=uniform(*RIB_HEIGHT_MM),
        first_rib_s=uniform(*FIRST_RIB_S),
        rib_spacing_s=rib_spacing_s,
        rib_drop_s=uniform(*RIB_ANTERIOR_DROP_S),
        rib_jitter=rng.normal(0.0, RIB_JITTER_S, (2, 12)),
        vertebra_radius=uniform(*VERTEBRA_RADIUS_MM) * math.sqrt(scale_x * scale_y),
        disc_fraction=uniform(*DISC_FRACTION),
        spine_phase=uniform(0.0, 1.0),
        right_dome=(uniform(*RIGHT_DOME_TOP_S), -uniform(*RIGHT_DOME_X_MM) * scale_x, uniform(*DOME_Y_OFFSET_MM)),
        left_dome=(uniform(*LEFT_DOME_TOP_S), uniform(*LEFT_DOME_X_MM) * scale_x, uniform(*DOME_Y_OFFSET_MM)),
        dome_half_width=uniform(*DOME_HALF_WIDTH_MM) * scale_x,
        dome_half_depth=uniform(*DOME_HALF_DEPTH_MM) * scale_y,
        apex_height_s=uniform(*APEX_HEIGHT_S),
        heart=heart,
        lung_hu=uniform(*LUNG_HU),
        lung_gradient=uniform(*LUNG_DEPENDENT_GRADIENT_HU),
        lung_texture=uniform(*LUNG_TEXTURE_HU),
        fat_hu=uniform(*FAT_HU),
        muscle_hu=uniform(*MUSCLE_HU),
        liver_hu=uniform(*LIVER_HU),
        blood_hu=uniform(*CONTRAST_BLOOD_HU) if contrast else uniform(*BLOOD_HU),
        contrast=contrast,
        noise_sigma=uniform(*SCANNER_NOISE_HU),
        noise_corr_mm=uniform(*NOISE_GRAIN_MM),
        table=bool(rng.random() < TABLE_PROBABILITY),
        table_gap=uniform(*TABLE_GAP_MM),
        fissure_visibility=uniform(*FISSURE_VISIBILITY),
        fissure_planes=dict(
            left=tuple(uniform(*bounds) for bounds in LEFT_OBLIQUE_FISSURE_S),
            right=tuple(uniform(*bounds) for bounds in RIGHT_OBLIQUE_FISSURE_S),
            horizontal=uniform(*HORIZONTAL_FISSURE_S),
        ),
        z_variation=np.array([uniform(*BODY_SIZE_VARIATION), uniform(*BODY_SIZE_PERIOD_MM), uniform(0, 2 * np.pi)]),
        stomach_air=uniform(*STOMACH_AIR),
    )
    # the heart hangs from the great vessels down to the diaphragm under it
    top = uniform(*HEART_TOP_S)
    under_heart = np.array(anatomy.y_at(heart.depth_fraction))
    bottom = float(diaphragm_s(anatomy, np.array(heart.centre_x), under_heart)) + 0.03
    heart.centre_s = 0.5 * (top + bottom)
    heart.half_height_s = 0.5 * (bottom - top)
    return anatomy


def diaphragm_s(anatomy: Anatomy, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Anatomical height ``s`` of the lung base (diaphragm surface) at in-plane points (X, Y)."""
    s_base = np.ones(np.broadcast(X, Y).shape, dtype=np.float32)
    for s_top, dome_x, dome_y in (anatomy.right_dome, anatomy.left_dome):
        bump = np.clip(
            1.0
            - ((X - dome_x) / anatomy.dome_half_width) ** 2
            - ((Y - anatomy.y_at(0.45) - dome_y) / anatomy.dome_half_depth) ** 2,
            0.0,
            1.0,
        )
        s_base = np.minimum(s_base, 1.0 - (1.0 - s_top) * bump)
    return s_base
