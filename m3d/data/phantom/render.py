"""The analytic anatomy rendered one axial slice at a time: body wall, lungs, heart, abdomen, fissures,
spine, ribs, sternum, scapulae and the CT table."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from .anatomy import Anatomy, diaphragm_s
from .constants import AIR_HU, FISSURE_HU, GAS_HU, GLANDULAR_HU, SKIN_HU
from .grid import Grid, index_range, lerp, lerp_at, ramp
from .mediastinum import Mediastinum
from .noise import SmoothNoise

Window = tuple[slice, slice]


class SliceRenderer:
    """Renders the analytic part of the anatomy one axial slice at a time.

    Everything that depends only on the direction from the cavity centre (the cavity outline, the
    wall layers, the body outline, the rib ring) is computed per slice on a 1-D table of angles and
    gathered per pixel; bones, fissures and organs are computed only on the pixels they can touch.
    Angles: ``phi`` from the posterior midline (0) to the anterior one (pi).
    """

    N_ANGLES = 4096

    def __init__(
        self, anatomy: Anatomy, grid: Grid, rng: np.random.Generator, mediastinum: Mediastinum, want_hu: bool = True
    ):
        self.anatomy, self.grid, self.mediastinum, self.want_hu = anatomy, grid, mediastinum, want_hu
        X, Y = np.meshgrid(grid.x_mm.astype(np.float32), grid.y_mm.astype(np.float32))
        self.X, self.Y = X, Y
        y_rel = Y - np.float32(anatomy.cavity_centre_y)
        self.radius = np.hypot(X, y_rel)  # from the cavity centre
        angle = np.arctan2(y_rel, X)  # 0 = patient left, +pi/2 = posterior
        self.phi = np.arccos(np.clip(y_rel / np.maximum(self.radius, 1e-3), -1.0, 1.0)).astype(np.float32)
        n_angles = self.N_ANGLES
        self.angle_bin = (np.floor((angle + np.pi) / (2 * np.pi) * n_angles).astype(np.int32)) % n_angles
        # the angle table: per-direction values, gathered per pixel through angle_bin
        table_angle = -np.pi + (np.arange(n_angles) + 0.5) * (2 * np.pi / n_angles)
        self.table_cos, self.table_sin = np.cos(table_angle), np.sin(table_angle)
        table_phi = np.arccos(np.clip(self.table_sin, -1.0, 1.0))
        exponent = 2.3 + 0.2 * np.clip(self.table_sin * 2.0, 0.0, 1.0)
        superellipse = (
            np.abs(self.table_cos / anatomy.cavity_half_width) ** exponent
            + np.abs(self.table_sin / anatomy.cavity_half_depth) ** exponent
        ) ** (-1.0 / exponent)
        wobble = 1.0 + sum(amp * np.cos(k * table_angle + phase) for k, amp, phase in anatomy.cavity_fourier)
        self.table_cavity_r = superellipse * wobble
        self.anterior_r = float(
            anatomy.cavity_half_depth
            * (1.0 + sum(amp * np.cos(-k * np.pi / 2 + phase) for k, amp, phase in anatomy.cavity_fourier))
        )
        self.table_outline_exponent = 2.1 + 1.2 * np.clip(self.table_sin * 1.5, 0.0, 1.0)

        # angular patterns of the wall layers (functions of phi = angle from the posterior midline)
        def around(centre: float, width: float) -> np.ndarray:
            return np.exp(-0.5 * ((table_phi - centre) / width) ** 2)

        self.pat_paraspinal = around(0.0, 0.3)
        self.pat_scapular = around(0.3 * np.pi, 0.3)
        self.pat_pectoral = around(0.72 * np.pi, 0.4)
        self.pat_shoulder = around(0.5 * np.pi, 0.45)
        self.pat_fat = 1.0 + anatomy.posterior_fat * around(0.3 * np.pi, 0.5)
        self.pat_breast = around(0.76 * np.pi, 0.16)
        self.scale = 1.0
        if want_hu:
            self.noise_lung = SmoothNoise(rng, grid.x_mm, grid.y_mm, grid.z_mm, 14.0)
            self.noise_mid = SmoothNoise(rng, grid.x_mm, grid.y_mm, grid.z_mm, 6.0)
            self.noise_fine = SmoothNoise(rng, grid.x_mm, grid.y_mm, grid.z_mm, 2.5)
        edge = self.edge = max(grid.pixel_spacing, 0.6)  # in-plane partial-volume ramp width
        self.edge_z = max(grid.thickness, grid.pixel_spacing)  # ramp width for boundaries crossed along z
        # slice-independent fields
        self.s_base = diaphragm_s(anatomy, X, Y)
        self.x_midline = -3.0 * anatomy.scale_x
        band_width = 1.5 + 7.0 * np.clip((Y - anatomy.y_at(0.45)) / (anatomy.y_at(0.9) - anatomy.y_at(0.45)), 0, 1)
        self.midline_band = ramp(np.abs(X - self.x_midline) - band_width, edge) * (Y > anatomy.y_front - 20)
        radius = anatomy.vertebra_radius
        vertebra_sd = (np.sqrt((X / (radius * 1.15)) ** 2 + ((Y - anatomy.y_vertebra) / radius) ** 2) - 1.0) * radius
        self.spine_zone = np.maximum(
            ramp(vertebra_sd - 3.0, edge), ramp(np.abs(X) - radius - 8.0, edge) * (Y > anatomy.y_vertebra)
        )
        s_apex = np.empty_like(X)  # where each lung's dome-shaped apex starts
        for side in (-1, 1):
            apex_x, apex_y = side * 55.0 * anatomy.scale_x, anatomy.y_at(0.6)
            distance2 = ((X - apex_x) / (60.0 * anatomy.scale_x)) ** 2 + ((Y - apex_y) / (50.0 * anatomy.scale_y)) ** 2
            np.copyto(s_apex, anatomy.apex_height_s * distance2, where=(X > self.x_midline) == (side > 0))
        self.s_apex = s_apex
        dependent = np.clip((Y - anatomy.y_at(0.0)) / (anatomy.y_vertebra + 20.0 - anatomy.y_at(0.0)), 0.0, 1.0)
        self.dependent = (dependent**1.5).astype(np.float32)

    # ---------------------------------------------------------------------------------------------
    def _tables(self, s: float, z: float) -> dict:
        """Per-direction radii of this slice's layers (cavity, muscle, body outline, rib ring, fat plane)."""
        anatomy = self.anatomy
        amplitude, period, phase = anatomy.z_variation
        size_z = 1.0 + amplitude * math.sin(2 * math.pi * z / period + phase)
        barrel = 1.0 - 0.35 * min(max(1.0 - s / 0.35, 0.0), 1.3) ** 2
        self.scale = barrel * size_z
        upper = min(max(1.0 - s / 0.55, 0.0), 1.0)
        shoulder = min(max((0.12 - s) / 0.25, 0.0), 1.0)
        breast_z = math.exp(-0.5 * ((s - 0.55) / 0.2) ** 2)
        cavity_r = self.table_cavity_r * self.scale
        muscle = (
            anatomy.muscle_mm
            + 36.0 * anatomy.scale_y * self.pat_paraspinal
            + 14.0 * upper * self.pat_pectoral
            + 45.0 * shoulder * self.pat_shoulder
            + (10.0 + 16.0 * upper) * self.pat_scapular
        )
        fat = anatomy.fat_mm * self.pat_fat
        muscle_r = cavity_r + 1.5 + anatomy.rib_thickness + muscle
        layers_r = muscle_r + fat + 1.5
        # a smooth outline around the layers (fat fills the difference), boxier at the back
        cos, sin = self.table_cos, self.table_sin
        extent_x = float(np.max(layers_r * np.abs(cos)))
        extent_front = float(np.max(-layers_r * sin))
        extent_back = float(np.max(layers_r * sin))
        half_y = np.where(sin < 0, extent_front, extent_back)
        exponent = self.table_outline_exponent
        outline_r = (np.abs(cos / extent_x) ** exponent + np.abs(sin / half_y) ** exponent) ** (-1.0 / exponent)
        body_r = np.maximum(layers_r, 0.985 * outline_r)
        body_r = body_r + anatomy.breast_mm * breast_z * self.pat_breast  # breasts stand out of the outline
        body_r = ndimage.gaussian_filter1d(body_r, self.N_ANGLES * 15.0 / 360.0, mode="wrap")  # no corners
        # the patient lies on the table: flatten the back
        back_r = float(np.max(np.where(np.abs(body_r * cos) < 20, body_r * sin, 0.0))) * 0.9
        flat = np.where(sin > 0.05, back_r / np.maximum(sin, 0.05), np.inf)
        body_r = np.minimum(body_r, flat)
        return dict(
            cavity_r=cavity_r,
            muscle_r=muscle_r,
            body_r=body_r,
            rib_ring=cavity_r + 1.0 + anatomy.rib_thickness * 0.5,
            fat_plane_r=cavity_r + 1.5 + anatomy.rib_thickness + 0.55 * muscle,
            back_y=anatomy.cavity_centre_y + back_r,
            upper=upper,
            breast_mm=anatomy.breast_mm * breast_z,
            breast_weight=self.pat_breast * breast_z * (anatomy.breast_mm > 0) * 1.5,
        )

    def render(self, k: int, mediastinum_sdf: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """``(hu, lung_mask)`` of slice ``k`` (``hu`` None without ``want_hu``); ``mediastinum_sdf`` is the
        slice's signed distance to the mediastinal tubes."""
        anatomy, grid = self.anatomy, self.grid
        X, radius = self.X, self.radius
        z = float(grid.z_mm[k])
        s = float(anatomy.s_of(z))
        edge, edge_z = self.edge, self.edge_z
        tables = self._tables(s, z)

        def gather(name: str) -> np.ndarray:
            return tables[name].astype(np.float32)[self.angle_bin]

        cavity_r = gather("cavity_r")
        body_distance = radius - gather("body_r")
        body = ramp(body_distance, edge)
        cavity = ramp(radius - cavity_r, edge)

        # ---- lungs: the cavity minus mediastinum, spine, above the domes, below the apices ------
        mediastinum = np.maximum(ramp(mediastinum_sdf - 4.0, edge), self.midline_band)
        heart = self._heart_field(z, s)
        if heart is not None:
            window, heart_sd, apex_fat = heart
            np.maximum(mediastinum[window], ramp(heart_sd - apex_fat, edge), out=mediastinum[window])
        below = ramp((self.s_base - s) * anatomy.length, edge_z)  # 1 = abdomen side
        above = ramp((s - self.s_apex) * anatomy.length, edge_z)  # 1 = above the apex
        lung = np.minimum(cavity, 1.0 - np.maximum.reduce([mediastinum, self.spine_zone, below, above]))
        lung_mask = lung > 0.5
        if not self.want_hu:
            return None, lung_mask

        # ---- HU --------------------------------------------------------------------------------
        n_fine = self.noise_fine.slice(k)
        n_mid = self.noise_mid.slice(k)
        n_lung = self.noise_lung.slice(k)
        hu = np.full(X.shape, AIR_HU, dtype=np.float32)
        if anatomy.table:
            self._table(hu, tables["back_y"], edge)
        # body: muscle, fat, skin
        lerp(hu, body, anatomy.muscle_hu + 8.0 * n_fine)
        fat_hu = anatomy.fat_hu + 10.0 * n_mid + 6.0 * n_fine
        lerp(hu, ramp(gather("muscle_r") - radius, edge) * body, fat_hu)
        if tables["breast_mm"] > 2.0:  # fibroglandular tissue in the breasts' fat
            breast = (np.clip(tables["breast_weight"], 0.0, 1.0)).astype(np.float32)[self.angle_bin]
            gland = np.clip((n_mid - 0.2) * 1.5, 0.0, 1.0) * breast * ramp(body_distance + 4.0, edge)
            gland *= ramp(gather("muscle_r") + 3.0 - radius, edge)
            lerp(hu, gland, GLANDULAR_HU + 8.0 * n_fine)
        lerp(hu, ramp(np.abs(body_distance + 1.0) - 1.0, edge), SKIN_HU)
        # intermuscular fat planes: pectoral muscles (upper chest), back muscles
        fat_plane_r = gather("fat_plane_r")
        near_plane = np.flatnonzero(np.abs(radius - fat_plane_r).ravel() < 0.8 + edge)
        weight = (0.7 * tables["upper"] * self.pat_pectoral + 0.6 * self.pat_paraspinal).astype(np.float32)
        weight = weight[self.angle_bin.ravel()[near_plane]]
        plane_distance = np.abs(radius.ravel()[near_plane] - fat_plane_r.ravel()[near_plane])
        alpha = ramp(plane_distance - 0.8, edge) * weight * body.ravel()[near_plane]
        lerp_at(hu, near_plane, alpha, fat_hu.ravel()[near_plane])
        # cavity content: mediastinal / extrapleural fat
        lerp(hu, cavity, fat_hu)
        # abdomen below the diaphragm
        abdomen = cavity * below
        if np.any(abdomen > 0):
            self._abdomen(hu, abdomen, s, n_fine, n_mid, edge)
        # heart and pericardial fat
        if heart is not None:
            window, heart_sd, apex_fat = heart
            part, part_cavity = hu[window], cavity[window]
            lerp(part, ramp(heart_sd - apex_fat, edge) * part_cavity, fat_hu[window])
            lerp(part, ramp(heart_sd, edge) * part_cavity, anatomy.muscle_hu + 5.0 + 5.0 * n_fine[window])
            if anatomy.contrast:
                lerp(part, ramp(heart_sd + 9.0, edge) * part_cavity, anatomy.blood_hu + 8.0 * n_mid[window])
        # lungs
        lung_hu = (
            anatomy.lung_hu
            + anatomy.lung_gradient * self.dependent
            + anatomy.lung_texture * n_lung
            + 0.5 * anatomy.lung_texture * n_mid
            + 6.0 * n_fine
        )
        lerp(hu, lung, lung_hu)
        self._fissures(hu, lung, s)
        # bones
        self._spine(hu, s, n_fine, edge)
        self._ribs(hu, s, gather("rib_ring"), n_fine, edge)
        self._sternum(hu, s, n_fine, edge)
        self._scapulae(hu, s, gather("rib_ring"), n_fine, edge, body)
        return hu, lung_mask

    # ---------------------------------------------------------------------------------------------
    def _window(self, x_low: float, x_high: float, y_low: float, y_high: float) -> Window | None:
        """The pixel window covering ``X in [x_low, x_high]``, ``Y in [y_low, y_high]`` (None if empty)."""
        col_start, col_stop = index_range(self.grid.x_mm, x_low, x_high)
        row_start, row_stop = index_range(self.grid.y_mm, y_low, y_high)
        if col_start >= col_stop or row_start >= row_stop:
            return None
        return (slice(row_start, row_stop), slice(col_start, col_stop))

    def _heart_field(self, z: float, s: float) -> tuple[Window, np.ndarray, np.ndarray] | None:
        """(window, signed distance to the heart incl. left atrium, pericardial fat width) or None."""
        anatomy = self.anatomy
        heart = anatomy.heart
        centre_x, centre_y = heart.centre_x, anatomy.y_at(heart.depth_fraction)
        centre_z = float(anatomy.z_of(heart.centre_s))
        half_height = heart.half_height_s * anatomy.length
        atrium_x, atrium_y, atrium_z = self.mediastinum.left_atrium
        atrium_half_height = 0.08 * anatomy.length
        margin = 20.0
        if abs(z - centre_z) > half_height + margin and abs(z - atrium_z) > atrium_half_height + margin:
            return None
        reach = max(heart.half_length, heart.half_width) + margin
        window = self._window(
            min(centre_x - reach, atrium_x - 60),
            max(centre_x + reach, atrium_x + 60),
            min(centre_y - reach, atrium_y - 40),
            max(centre_y + reach, atrium_y + 40),
        )
        if window is None:
            return None
        X, Y = self.X[window], self.Y[window]
        cos_angle, sin_angle = math.cos(heart.angle), math.sin(heart.angle)
        along = (X - centre_x) * cos_angle - (Y - centre_y) * sin_angle
        across = (X - centre_x) * sin_angle + (Y - centre_y) * cos_angle
        heart_q = (
            (along / heart.half_length) ** 2 + (across / heart.half_width) ** 2 + ((z - centre_z) / half_height) ** 2
        )
        heart_sd = (np.sqrt(heart_q) - 1.0) * 0.5 * (heart.half_length + heart.half_width)
        atrium_q = (
            ((X - atrium_x) / (36 * anatomy.scale_x)) ** 2
            + ((Y - atrium_y) / (22 * anatomy.scale_y)) ** 2
            + ((z - atrium_z) / atrium_half_height) ** 2
        )
        heart_sd = np.minimum(heart_sd, (np.sqrt(atrium_q) - 1.0) * 25.0)
        heart_sd = np.maximum(heart_sd, (s - self.s_base[window] - 0.01) * anatomy.length)
        apex_fat = heart.fat_mm + 6.0 * np.clip(along / heart.half_length, 0, 1) ** 2
        return window, heart_sd, apex_fat

    def _table(self, hu: np.ndarray, back_y: float, edge: float) -> None:
        """The CT table under the patient's back: a curved carbon shell around a foam core."""
        table_y = back_y + self.anatomy.table_gap
        window = self._window(-240.0, 240.0, table_y - 3.0, table_y + 80.0)
        if window is None:
            return
        X, Y, part = self.X[window], self.Y[window], hu[window]
        curve = table_y + 0.0009 * X**2
        core = ((Y > curve) & (Y < curve + 18.0) & (np.abs(X) < 225)).astype(np.float32)
        lerp(part, core, -850.0)
        lerp(part, ramp(np.abs(Y - curve) - 1.2, edge) * (np.abs(X) < 220), 150.0)
        lerp(part, ramp(np.abs(Y - curve - 18.0) - 1.5, edge) * (np.abs(X) < 230), 250.0)

    def _abdomen(
        self, hu: np.ndarray, abdomen: np.ndarray, s: float, n_fine: np.ndarray, n_mid: np.ndarray, edge: float
    ) -> None:
        """Under the diaphragm: fat, liver, spleen, stomach (with gas) and the diaphragm muscle."""
        anatomy = self.anatomy
        rows = np.flatnonzero(abdomen.any(axis=1))
        cols = np.flatnonzero(abdomen.any(axis=0))
        window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        X, Y, hu, abdomen = self.X[window], self.Y[window], hu[window], abdomen[window]
        n_fine, n_mid = n_fine[window], n_mid[window]
        depth_below = (s - self.s_base[window]) * anatomy.length  # mm below the diaphragm surface (>0 inside)
        diaphragm_muscle = ramp(np.abs(depth_below - 2.5) - 2.5, edge)
        lerp(hu, abdomen, anatomy.fat_hu + 12.0 * n_mid)
        # liver: right side and across the midline anteriorly
        liver_edge = 15.0 * anatomy.scale_x - 0.45 * (Y - anatomy.y_at(0.2))
        liver = ramp(X - liver_edge, 6.0) * ramp(2.0 - depth_below, edge)
        lerp(hu, abdomen * liver, anatomy.liver_hu + 4.0 * n_mid + 4.0 * n_fine)
        # spleen: left posterolateral
        spleen_q = ((X - 85 * anatomy.scale_x) / (32 * anatomy.scale_x)) ** 2 + (
            (Y - anatomy.y_at(0.85)) / (50 * anatomy.scale_y)
        ) ** 2
        spleen = ramp((np.sqrt(spleen_q) - 1.0) * 35.0, edge) * ramp(4.0 - depth_below, edge)
        lerp(hu, abdomen * spleen, anatomy.liver_hu - 10.0 + 4.0 * n_fine)
        # stomach: left anterior, gas anteriorly (the patient is supine)
        stomach_q = ((X - 55 * anatomy.scale_x) / (48 * anatomy.scale_x)) ** 2 + (
            (Y - anatomy.y_at(0.3)) / (40 * anatomy.scale_y)
        ) ** 2
        stomach_sd = (np.sqrt(stomach_q) - 1.0) * 42.0
        stomach = ramp(stomach_sd, edge) * ramp(4.0 - depth_below, edge)
        lerp(hu, abdomen * stomach, 35.0 + 5 * n_fine)
        inner = ramp(stomach_sd + 4.0, edge) * stomach
        lerp(hu, abdomen * inner, 10.0 + 8 * n_mid)
        gas = inner * ramp(Y - anatomy.y_at(0.3) + (10.0 + 25.0 * anatomy.stomach_air) * anatomy.scale_y, edge)
        lerp(hu, abdomen * gas, GAS_HU)
        lerp(hu, abdomen * diaphragm_muscle, anatomy.muscle_hu)

    def _fissures(self, hu: np.ndarray, lung: np.ndarray, s: float) -> None:
        """The oblique fissures of both lungs and the right horizontal one: faint lines in the lung."""
        anatomy, grid = self.anatomy, self.grid
        if anatomy.fissure_visibility <= 0:
            return
        in_lung = np.flatnonzero(lung.ravel() > 0.01)
        if not len(in_lung):
            return
        X, Y, lung_fraction = self.X.ravel()[in_lung], self.Y.ravel()[in_lung], lung.ravel()[in_lung]
        x_midline = self.x_midline
        y_back, y_front = anatomy.y_at(1.05), anatomy.y_at(-0.05)
        t = np.clip((Y - y_back) / (y_front - y_back), 0.0, 1.0)  # 0 back .. 1 front
        planes = []
        for name, side in (("left", 1), ("right", -1)):
            s_back, extra = anatomy.fissure_planes[name]
            slope = extra * anatomy.length / max(y_front - y_back, 1.0)  # mm of z per mm of y
            distance = np.abs((s - s_back - extra * t) * anatomy.length) / math.sqrt(1.0 + slope**2)
            planes.append((distance, (X - x_midline) * side > 0, slope))
        s_horizontal = anatomy.fissure_planes["horizontal"]
        s_oblique_right = anatomy.fissure_planes["right"][0] + anatomy.fissure_planes["right"][1] * t
        right_upper = (X < x_midline) & (s < s_oblique_right) & (X < -25 * anatomy.scale_x)
        planes.append((np.abs((s - s_horizontal) * anatomy.length) + 0 * X, right_upper, 0.0))
        for distance, where, slope in planes:
            width = max(grid.pixel_spacing, grid.thickness * slope / math.sqrt(1.0 + slope**2), 0.8)
            near = where & (distance < 2.0 * width)
            if not near.any():
                continue
            visibility = np.exp(-0.5 * (distance[near] / (0.5 * width)) ** 2) * (
                min(1.0, 1.2 / width) * anatomy.fissure_visibility * 0.35
            )
            lerp_at(hu, in_lung[near], visibility * lung_fraction[near], FISSURE_HU)

    def _spine(self, hu: np.ndarray, s: float, n_fine: np.ndarray, edge: float) -> None:
        """A thoracic vertebra (body or disc, laminae, pedicles, transverse and spinous processes) and the
        spinal canal, by where this slice falls within its vertebral level."""
        anatomy = self.anatomy
        radius = anatomy.vertebra_radius
        y_vertebra = anatomy.y_vertebra
        window = self._window(-radius - 45.0, radius + 45.0, y_vertebra - radius - 6.0, y_vertebra + radius + 70.0)
        if window is None:
            return
        X, Y, n_fine, part = self.X[window], self.Y[window], n_fine[window], hu[window]
        level = (s - anatomy.first_rib_s) / anatomy.rib_spacing_s + 0.35 + anatomy.spine_phase * 0.1
        within = level - math.floor(level)  # 0 .. 1 through one vertebral level
        body_sd = (np.sqrt((X / (radius * 1.15)) ** 2 + ((Y - anatomy.y_vertebra) / radius) ** 2) - 1.0) * radius
        vertebral_body = ramp(body_sd, edge)
        if within < anatomy.disc_fraction:
            lerp(part, vertebral_body, 85.0 + 6.0 * n_fine)
        else:
            lerp(part, vertebral_body, 650.0 + 60.0 * n_fine)
            lerp(part, ramp(body_sd + 1.6, edge), 210.0 + 45.0 * n_fine)
        canal_radius = 7.5 * math.sqrt(anatomy.scale_x * anatomy.scale_y)
        canal_y = anatomy.y_vertebra + radius + canal_radius * 0.85
        canal_distance = np.hypot(X / 1.15, Y - canal_y)
        angle = np.arctan2(np.abs(X), Y - canal_y)  # 0 posterior .. pi anterior
        ring = ramp(np.abs(canal_distance - canal_radius - 3.2) - 3.0, edge)
        bone_hu = 560.0 + 60.0 * n_fine
        if 0.12 < within < 0.92:  # laminae
            lerp(part, ring * (angle < 0.55 * np.pi), bone_hu)
        if 0.28 < within < 0.66:  # pedicles
            lerp(part, ring * (angle >= 0.55 * np.pi), bone_hu)
        if 0.3 < within < 0.72:  # transverse processes, angled backwards
            abs_x = np.abs(X)
            process_y = canal_y + 1.0 + 0.35 * (abs_x - canal_radius)
            beyond_ends = np.maximum(canal_radius + 2.0 - abs_x, abs_x - (radius + 26.0 * anatomy.scale_x))
            transverse = ramp(np.maximum(np.abs(Y - process_y) - 4.5, beyond_ends), edge)
            lerp(part, transverse, bone_hu)
        if within > 0.38:  # spinous process, sloping down
            tip_y = canal_y + canal_radius + 10.0 + 26.0 * anatomy.scale_y * (within - 0.38) / 0.62
            spinous = ramp(np.maximum(np.abs(X) - 3.5, np.maximum(canal_y + canal_radius - Y, Y - tip_y)), edge)
            lerp(part, spinous, bone_hu)
        lerp(part, ramp(canal_distance - canal_radius, edge), 25.0 + 5 * n_fine)  # spinal canal

    def _ribs(self, hu: np.ndarray, s: float, rib_ring: np.ndarray, n_fine: np.ndarray, edge: float) -> None:
        """Twelve ribs a side (cortex, marrow, costal cartilage), sloping down towards the front."""
        anatomy = self.anatomy
        half_thickness, half_height = anatomy.rib_thickness * 0.5, anatomy.rib_height * 0.5
        near_ring = np.flatnonzero(np.abs(self.radius - rib_ring).ravel() < half_thickness + edge)
        if not len(near_ring):
            return
        radius, phi, X = self.radius.ravel()[near_ring], self.phi.ravel()[near_ring], self.X.ravel()[near_ring]
        drop = anatomy.rib_drop_s * (phi / np.pi) ** 1.3
        level = (s - drop - anatomy.first_rib_s) / anatomy.rib_spacing_s
        rib = np.clip(np.rint(level), 0, 11)
        rib_index = rib.astype(np.intp)
        jitter = anatomy.rib_jitter[(X > 0).astype(np.intp), rib_index]
        dz = ((level - rib) * anatomy.rib_spacing_s - jitter) * anatomy.length
        dr = radius - rib_ring.ravel()[near_ring]
        # smaller first ribs; the lowest ribs end early (floating ribs)
        rib_half_height = half_height * np.where(rib_index < 1, 0.8, 1.0)
        # 1 on the surface of the rib's elliptic cross-section, 0 on its axis
        ellipse_r = np.sqrt((dr / half_thickness) ** 2 + (dz / rib_half_height) ** 2)
        phi_end = np.where(rib_index >= 10, 0.45 * np.pi, np.where(rib_index >= 7, 0.9 * np.pi, 0.93 * np.pi))
        phi_cartilage = np.where(rib_index < 1, 0.78 * np.pi, 0.68 * np.pi + 0.02 * rib_index)
        along = ramp(np.maximum(0.12 * np.pi - phi, phi - phi_end) * radius, edge)
        bone = ramp((ellipse_r - 1.0) * half_thickness, edge) * along * (np.abs(level - rib) < 0.5)
        keep = bone > 0
        if not keep.any():
            return
        pixels, bone, ellipse_r = near_ring[keep], bone[keep], ellipse_r[keep]
        phi, phi_cartilage = phi[keep], phi_cartilage[keep]
        fine = n_fine.ravel()[pixels]
        osseous = bone * (phi <= phi_cartilage)
        lerp_at(hu, pixels, osseous, 850.0 + 120.0 * fine)
        lerp_at(hu, pixels, ramp((ellipse_r - 0.62) * half_thickness, edge) * osseous, 240.0 + 40.0 * fine)
        lerp_at(hu, pixels, bone * (phi > phi_cartilage), 110.0 + 20.0 * fine)

    def _sternum(self, hu: np.ndarray, s: float, n_fine: np.ndarray, edge: float) -> None:
        """Manubrium, body and tapering xiphoid behind the anterior chest wall."""
        anatomy = self.anatomy
        if not (0.02 < s < 0.74):
            return
        manubrium = s < 0.24
        half_width = (24.0 if manubrium else 15.0) * anatomy.scale_x
        half_thickness = 6.5 if manubrium else 5.5
        centre_y = anatomy.cavity_centre_y - self.anterior_r * self.scale - 1.5 - half_thickness
        if 0.6 < s:  # xiphoid tapers
            half_width *= max(0.35, 1.0 - (s - 0.6) / 0.2)
        window = self._window(
            -half_width - 3, half_width + 3, centre_y - half_thickness - 3, centre_y + half_thickness + 3
        )
        if window is None:
            return
        X, Y, part, fine = self.X[window], self.Y[window], hu[window], n_fine[window]
        sternum_sd = (np.sqrt((X / half_width) ** 2 + ((Y - centre_y) / half_thickness) ** 2) - 1.0) * half_thickness
        lerp(part, ramp(sternum_sd, edge), 650.0 + 60 * fine)
        lerp(part, ramp(sternum_sd + 1.5, edge), 220.0 + 40 * fine)

    def _scapulae(
        self, hu: np.ndarray, s: float, rib_ring: np.ndarray, n_fine: np.ndarray, edge: float, body: np.ndarray
    ) -> None:
        """The shoulder blades: plates over the upper back ribs."""
        anatomy = self.anatomy
        if not (-0.3 < s < 0.5):
            return
        fade = min(1.0, (0.5 - s) / 0.1)
        width = 0.16 * np.pi * fade
        centre = 0.3 * np.pi
        pixels = np.flatnonzero(np.abs(self.phi - centre).ravel() < width + 0.05)
        if not len(pixels):
            return
        radius, phi = self.radius.ravel()[pixels], self.phi.ravel()[pixels]
        plate_r = (
            rib_ring.ravel()[pixels]
            + anatomy.rib_thickness * 0.5
            + 10.0
            + 8.0 * np.clip((phi - 0.2 * np.pi) / (0.3 * np.pi), 0, 1)
        )
        plate = ramp(np.abs(radius - plate_r) - 2.0 - 2.0 * (phi < 0.2 * np.pi), edge)
        along = ramp((np.abs(phi - centre) - width) * radius, edge)
        lerp_at(hu, pixels, plate * along * body.ravel()[pixels], 450.0 + 60 * n_fine.ravel()[pixels])
