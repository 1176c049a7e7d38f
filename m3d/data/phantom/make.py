"""`make_phantom`: one synthetic chest CT (`PhantomCase`) on a real LIDC scan's geometry, with real LIDC
nodules transplanted, from a seed."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..ct import CTMetadata, CTVolume
from ..lidc import LIDCDatabase, LIDCScan
from .anatomy import sample_anatomy
from .chest import render_chest, single_threaded_blas
from .grid import Grid
from .noise import add_scanner_noise
from .nodules import paint_nodules, transplant_nodules
from .sources import candidate_scans, geometry_candidates, nodule_pool, open_database

Seed = int | Sequence[int] | np.random.SeedSequence
LIDC_MATRIX = 512  # LIDC's in-plane matrix: a phantom of ``size`` keeps the real field of view


@dataclass
class PhantomCase:
    """A synthetic chest CT with its true nodules.

    ``volume``: int16 HU with real LIDC geometry; ``lidc``: the phantom's own `LIDCScan` whose
    annotations are the transplanted real contours (real characteristics, phantom pixel coordinates
    and z positions); ``lung_mask``: bool (z, y, x); ``source_series_uids``: the LIDC series each
    nodule came from (one entry per nodule, in ``nodules`` order).
    """

    volume: CTVolume
    lidc: LIDCScan
    lung_mask: np.ndarray
    source_series_uids: list[str]
    geometry_series_uid: str = ""
    nodules: list[dict] = field(default_factory=list)
    nodule_mask: np.ndarray | None = field(default=None, repr=False)
    seed_entropy: str = ""

    @property
    def patient_id(self) -> str:
        return self.lidc.patient_id


def _seed_sequence(seed: Seed) -> np.random.SeedSequence:
    if isinstance(seed, np.random.SeedSequence):
        return seed
    if isinstance(seed, (int, np.integer)):
        return np.random.SeedSequence(int(seed))
    return np.random.SeedSequence([int(s) for s in seed])


def _seed_text(seeds: np.random.SeedSequence) -> str:
    entropy = seeds.entropy if not isinstance(seeds.entropy, (list, tuple)) else list(seeds.entropy)
    return f"{entropy}/{list(seeds.spawn_key)}"


def uid_seed(seed_text: str) -> str:
    """What the phantom's DICOM UIDs derive from (`PhantomCase.seed_entropy` -> the same UIDs)."""
    return f"m3d-phantom/{seed_text}"


def _uid(seed: str, *parts: str) -> str:
    """A UID derived from the seed (the phantom's study and series UIDs)."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[seed, *parts]))


def make_phantom(
    seed: Seed = 0,
    size: int = 512,
    db: LIDCDatabase | str | Path | None = None,
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
    field of view ``size`` times it, the anatomy scaled to fit: forensic traces live at that scale).
    ``db``: an LIDC database, or its path (default: `m3d.data.lidc.LIDCDatabase()`). ``max_slices``: keep
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
    seeds = _seed_sequence(seed)
    rng_geometry, rng_anatomy, rng_nodules, rng_noise = (np.random.default_rng(s) for s in seeds.spawn(4))
    db = open_database(db)
    scans = candidate_scans(db)
    eligible = geometry_candidates(scans)
    geometry = eligible[int(rng_geometry.integers(len(eligible)))]

    # ---- geometry -------------------------------------------------------------------------------
    pixel = geometry.pixel_spacing_mm if native_spacing else geometry.pixel_spacing_mm * float(LIDC_MATRIX) / size
    fov = pixel * size
    z_full = geometry.z_positions_mm
    anatomy = sample_anatomy(rng_anatomy, float(z_full[0]), float(z_full[-1]), fov)
    z = z_full
    if max_slices is not None and len(z_full) > max_slices:
        s_centre = rng_geometry.uniform(0.3, 0.65)
        k_centre = int(np.argmin(np.abs(z_full - anatomy.z_of(s_centre))))
        start = int(np.clip(k_centre - max_slices // 2, 0, len(z_full) - max_slices))
        z = z_full[start : start + max_slices]
    centre = (np.arange(size) - (size - 1) / 2.0) * pixel
    grid = Grid(centre, centre.copy(), np.asarray(z, dtype=np.float64), float(geometry.slice_thickness_mm))
    origin_x = origin_y = -fov / 2.0  # LPS of pixel (0, 0): the typical LIDC value (the DB stores no origin)

    # ---- anatomy --------------------------------------------------------------------------------
    with single_threaded_blas():
        chest = render_chest(anatomy, grid, rng_anatomy)

    # ---- nodules --------------------------------------------------------------------------------
    if isinstance(n_nodules, (tuple, list)):
        n_wanted = int(rng_nodules.integers(int(n_nodules[0]), int(n_nodules[1]) + 1))
    else:
        n_wanted = int(n_nodules)
    min_diameter = max(3.0, 3.0 * pixel) if min_diameter_mm is None else float(min_diameter_mm)
    placed = []
    if n_wanted > 0:
        pool = nodule_pool(db, scans, geometry, rng_nodules, min_diameter, n_wanted)
        placed = transplant_nodules(pool, rng_nodules, chest, grid, n_wanted)

    text = _seed_text(seeds)
    if patient_id is None:
        number = int(seed) if isinstance(seed, (int, np.integer)) else zlib.crc32(text.encode()) % 10000
        patient_id = f"M3D-PHANTOM-{number:04d}"
    seed_for_uids = uid_seed(text)
    scan = LIDCScan(
        patient_id=patient_id,
        series_instance_uid=_uid(seed_for_uids, "series"),
        study_instance_uid=_uid(seed_for_uids, "study"),
        slice_thickness_mm=float(geometry.slice_thickness_mm),
        pixel_spacing_mm=float(pixel),
        z_positions_mm=np.asarray(grid.z_mm, dtype=np.float64).copy(),
        annotations=[a for nodule in placed for a in nodule.annotations],
        rows=size,
        columns=size,
        origin_xy_mm=(float(origin_x), float(origin_y)),
    )
    # ---- the phantom's own nodules: their consensus masks painted --------------------------------
    nodule_mask, records = paint_nodules(scan, placed, chest.hu, grid, rng_nodules)

    # ---- CT noise and the volume ----------------------------------------------------------------
    hu = add_scanner_noise(chest.hu, grid, anatomy, rng_noise)
    volume = CTVolume(
        hu=hu,
        spacing_mm=(grid.slice_step, pixel, pixel),
        origin_mm=(float(origin_x), float(origin_y), float(grid.z_mm[0])),
        metadata=CTMetadata(
            patient_id=patient_id,
            study_instance_uid=scan.study_instance_uid,
            series_instance_uid=scan.series_instance_uid,
            description="M3D synthetic chest CT (real LIDC geometry and nodule contours)",
            slice_thickness_mm=scan.slice_thickness_mm,
        ),
    )
    return PhantomCase(
        volume=volume,
        lidc=scan,
        lung_mask=chest.lung_mask,
        source_series_uids=[r["source_series_uid"] for r in records],
        geometry_series_uid=geometry.series_instance_uid,
        nodules=records,
        nodule_mask=nodule_mask,
        seed_entropy=text,
    )
