"""Import a downloaded official M3Dsynth release into the builder's layout (`m3d import-official`).

The release (``get_M3Dsynth.sh``) holds, per generator ``<mod>`` (``pix2pix``, ``cycle``, ``diffusion``;
``real`` when converted too), ``<mod>/scan/<img_id>/slide%04d.tiff``: the tampered scan as 16-bit
slices of the *stored* DICOM values shifted to be non-negative, ordered by descending
ImagePositionPatient z, and ``<mod>/label/<img_id>/slide%04d.tiff``: the boolean ground truth. The
tables ``data.csv`` / ``sets.csv`` / ``centers.csv`` / ``LIDC.csv`` (from the official repository's
``data/`` folder) say which LIDC-IDRI series each sample comes from, its site and split.

Each sample becomes a `FEATURES` example on the geometry of its LIDC-IDRI series (read from
``--lidc-root``): the scan's HU are the source series' own wherever the TIFF matches it, and the
release's values, mapped to HU by the linear map fitted on the matching voxels, where it was tampered.
The pristine example of a site is the source series itself. Nodule diameter and malignancy come from
the series' LIDC XML when it is there (the grouped nodule at the site), else they are left empty.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..data.ct import CTVolume
from ..data.lidc import Nodule, group_nodules, read_lidc_xml, volume_z_positions
from ..tamper.plan import GENERATOR_CODES, Site, read_official_plan, read_table
from ..constants import FAKE_GENERATORS, TASKS
from .generate import PLAN_SPLITS, Outcome, ScanJob, SiteJob, make_example, site_voxel

logger = logging.getLogger(__name__)

MODS = {code: generator for generator, code in GENERATOR_CODES.items()}  # "cycle" -> "cyclegan", ...
SLICE_NAME = "slide{:04d}.tiff"
CENTERS_CSV_COLUMNS = ("img_id", "mod", "center_test_z", "center_test_y", "center_test_x")
MIN_MATCHING_FRACTION = 0.99  # of the untampered voxels that the fitted map must reproduce exactly
SITE_NODULE_TOLERANCE_MM = 5.0  # a grouped LIDC nodule counts as the site's if its centroid is this close


@dataclass
class OfficialTables:
    """The official tables: sites (with their img ids and generators), test-crop centres per
    ``(img_id, mod)`` and the DICOM folder (relative to the LIDC-IDRI root) per ``(orig_id, sdir_id)``."""

    sites: list[Site]
    test_crops: dict[tuple[str, str], tuple[float, float, float]]
    dicom_folders: dict[tuple[str, str], str]


def _read_csv(path: Path, columns: Sequence[str]) -> list[dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass --tables, the official repository's data/ folder")
    return [row for _, row in read_table(path, columns)]


def tables_folder(release: str | Path, tables: str | Path | None = None) -> Path:
    """Where the tables are: ``tables``, else ``<release>/data`` or ``<release>`` if they hold data.csv."""
    if tables is not None:
        return Path(tables)
    release = Path(release)
    return release / "data" if (release / "data" / "data.csv").is_file() else release


def read_official_tables(folder: str | Path) -> OfficialTables:
    """Read ``data.csv``, ``sets.csv``, ``centers.csv`` and ``LIDC.csv`` from ``folder``."""
    folder = Path(folder)
    sites = read_official_plan(folder)
    centers = _read_csv(folder / "centers.csv", CENTERS_CSV_COLUMNS)
    lidc = _read_csv(folder / "LIDC.csv", ("orig_id", "sdir_id", "dicom"))
    test_crops = {
        (row["img_id"], row["mod"]): (
            float(row["center_test_z"]),
            float(row["center_test_y"]),
            float(row["center_test_x"]),
        )
        for row in centers
    }
    return OfficialTables(sites, test_crops, {(row["orig_id"], row["sdir_id"]): row["dicom"] for row in lidc})


def read_tiff_stack(folder: Path) -> np.ndarray:
    """The slices ``slide0000.tiff, slide0001.tiff, ...`` of ``folder`` as one ``(slices, rows, cols)`` array."""
    import tifffile

    slices = []
    while (folder / SLICE_NAME.format(len(slices))).is_file():
        slices.append(tifffile.imread(folder / SLICE_NAME.format(len(slices))))
    if not slices:
        raise FileNotFoundError(f"no {SLICE_NAME.format(0)} in {folder}")
    return np.stack(slices)


def write_tiff_stack(folder: Path, stack: np.ndarray) -> None:
    """Write ``stack`` ``(slices, rows, cols)`` as ``slide0000.tiff, slide0001.tiff, ...`` in ``folder`` (new):
    LZMA-compressed, as the release; black is zero, so that PIL (the official loader) reads boolean labels too."""
    import tifffile

    folder.mkdir(parents=True)
    for index, image in enumerate(stack):
        tifffile.imwrite(folder / SLICE_NAME.format(index), image, compression="lzma", photometric="minisblack")


def release_order(volume: CTVolume) -> np.ndarray:
    """``order[k]``: the volume slice that is the release's slice ``k`` (the official conversion sorts the
    slices by descending ImagePositionPatient z, whatever the series' own order)."""
    return np.argsort(-volume_z_positions(volume), kind="stable")


def stored_to_hu_map(stored: np.ndarray, hu: np.ndarray, where: np.ndarray) -> tuple[float, float]:
    """``(slope, intercept)`` with ``hu = slope * stored + intercept`` on the voxels ``where`` (a least-squares
    fit of the release's shifted stored values to the source series' HU, checked to be exact)."""
    x, y = stored[where].astype(np.float64), hu[where].astype(np.float64)
    if x.size < 2 or np.ptp(x) == 0:
        raise ValueError("too few untampered voxels to relate the release's values to the LIDC-IDRI series")
    slope, intercept = np.polyfit(x, y, 1)
    matching = np.mean(np.abs(slope * x + intercept - y) < 0.5)
    if matching < MIN_MATCHING_FRACTION:
        raise ValueError(
            f"the release's slices do not match the LIDC-IDRI series (only {matching:.1%} of the untampered voxels "
            f"follow one linear map): is --lidc-root the download the release was made from?"
        )
    return float(slope), float(intercept)


def tampered_volume(source: CTVolume, stored_zyx: np.ndarray, label_zyx: np.ndarray) -> CTVolume:
    """The tampered scan on ``source``'s grid: its own HU where the release's values match it, the release's
    values (mapped to HU) where they differ. ``stored_zyx`` / ``label_zyx`` are already in volume order."""
    if stored_zyx.shape != source.shape:
        raise ValueError(f"the release's scan has shape {stored_zyx.shape}, the LIDC-IDRI series {source.shape}")
    unclipped = (stored_zyx > 0) & ~label_zyx
    slope, intercept = stored_to_hu_map(stored_zyx, source.hu, unclipped)
    expected = np.clip(np.rint((source.hu.astype(np.float64) - intercept) / slope), 0, np.iinfo(np.uint16).max)
    changed = stored_zyx != expected
    hu = source.hu.copy()
    hu[changed] = np.clip(np.rint(slope * stored_zyx[changed] + intercept), -32768, 32767).astype(np.int16)
    return source.with_hu(hu)


def series_nodules(folder: Path, volume: CTVolume) -> list[Nodule]:
    """The grouped LIDC nodules of the series in ``folder`` (from its LIDC XML; none without one)."""
    from ..data.lidc_discovery import is_lidc_xml

    xmls = [path for path in sorted(folder.glob("*.xml")) if is_lidc_xml(path)]
    return group_nodules(read_lidc_xml(xmls[0], volume)) if xmls else []


def site_nodule(
    nodules: Sequence[Nodule], volume: CTVolume, site_zyx: np.ndarray
) -> tuple[float | None, float | None]:
    """Diameter (mm) and median malignancy of the nodule at a site (volume voxel); ``(None, None)`` when
    no nodule's centroid lies within `SITE_NODULE_TOLERANCE_MM`."""
    site_mm = volume.voxel_to_world(site_zyx)
    best, best_distance = None, SITE_NODULE_TOLERANCE_MM
    for nodule in nodules:
        distance = float(np.linalg.norm(volume.voxel_to_world(nodule.centroid_zyx) - site_mm))
        if distance <= best_distance:
            best, best_distance = nodule, distance
    return (None, None) if best is None else (best.diameter_mm, best.malignancy)


def official_jobs(tables: OfficialTables, lidc_root: str | Path, tasks: Sequence[str] = TASKS) -> list[ScanJob]:
    """One `ScanJob` per LIDC-IDRI series of the release (table order); series missing under
    ``lidc_root`` are left out with a log line, and an error is raised when none is found."""
    from ..data.dicom import read_dicom_series

    lidc_root = Path(lidc_root)
    by_series: dict[tuple[str, str], list[SiteJob]] = {}
    for site in tables.sites:
        if site.task in tasks:
            by_series.setdefault((site.patient_id, site.series_instance_uid), []).append(
                SiteJob(site.extra["img_ids"][0], site)
            )
    jobs, missing = [], []
    for (patient_id, sdir_id), site_jobs in by_series.items():
        relative = tables.dicom_folders.get((patient_id, sdir_id))
        folder = None if relative is None else lidc_root / relative
        if folder is None or not folder.is_dir():
            missing.append(f"{patient_id}/{sdir_id}")
            continue
        split = site_jobs[0].site.split
        jobs.append(
            ScanJob(
                patient_id,
                sdir_id,
                PLAN_SPLITS.get(split, split),
                site_jobs,
                lambda folder=folder: read_dicom_series(folder),
            )
        )
    if missing:
        logger.info(
            "%d series of the release are not under %s and are left out: %s",
            len(missing),
            lidc_root,
            ", ".join(missing[:5]),
        )
    if not jobs:
        raise FileNotFoundError(
            f"none of the release's LIDC-IDRI series (LIDC.csv's dicom folders) is under {lidc_root}"
        )
    return jobs


def official_examples(
    job: ScanJob,
    volume: CTVolume,
    release: str | Path,
    tables: OfficialTables,
    generators: Sequence[str],
    lidc_folder: Path | None = None,
) -> Iterator[tuple[dict[str, Any] | None, Outcome]]:
    """The examples of one series: per site, the pristine scan, then each selected generator's sample
    that the release holds (a sample the release lacks is "skipped")."""
    release = Path(release)
    order = release_order(volume)
    z_mm = volume_z_positions(volume)[order]
    job = replace(job, z_positions_mm=z_mm)  # the release's slice k lies at z_mm[k]: sites and crops go through it
    nodules = series_nodules(lidc_folder, volume) if lidc_folder is not None else []
    series_uid = volume.metadata.series_instance_uid or job.series_instance_uid
    empty = np.zeros(volume.shape, bool)
    for site_job in job.sites:
        site_id = site_job.site_id
        diameter, malignancy = site_nodule(nodules, volume, site_voxel(volume, site_job.site.center_zyx, z_mm))
        site = replace(
            site_job.site, diameter_mm=float("nan") if diameter is None else diameter, malignancy=malignancy
        )
        for generator in ("real", *generators):
            mod, img_id = GENERATOR_CODES[generator], f"{site_id}_{generator}"
            with_crop = SiteJob(site_id, site, tables.test_crops.get((site_id, mod)))
            if generator == "real":
                example = make_example(job, with_crop, "real", volume, empty, diameter_mm=diameter)
            else:
                scan_folder, label_folder = release / mod / "scan" / site_id, release / mod / "label" / site_id
                if mod not in site.extra["generators"] or not scan_folder.is_dir():
                    yield None, Outcome(img_id, generator, site.task, "skipped", f"not in the release ({scan_folder})")
                    continue
                stored, label = read_tiff_stack(scan_folder), read_tiff_stack(label_folder) > 0
                if stored.shape != label.shape:
                    raise ValueError(f"{scan_folder} and {label_folder} hold stacks of different shapes")
                stored[order], label[order] = stored.copy(), label.copy()  # release order -> volume order
                tampered = tampered_volume(volume, stored, label)
                example = make_example(
                    job,
                    with_crop,
                    generator,
                    tampered,
                    label,
                    diameter_mm=diameter if site.task == "remove" else None,
                    pristine=volume,
                )
            example["series_instance_uid"] = series_uid
            yield example, Outcome(img_id, generator, site.task, "kept")


def import_official(
    release: str | Path,
    lidc_root: str | Path,
    out: str | Path,
    *,
    tables: str | Path | None = None,
    generators: Sequence[str] = FAKE_GENERATORS,
    tasks: Sequence[str] = TASKS,
    limit: int | None = None,
    scans_per_shard: int = 4,
    overwrite: bool = False,
    progress: bool = True,
):
    """Write (or resume) the dataset folder ``out`` from an official release; returns its `BuildState`."""
    from .writer import finalize, prepare_folder, read_state, write_shards

    unknown = sorted(set(generators) - set(FAKE_GENERATORS)) + sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown generator(s) or task(s) {unknown}: choose among {FAKE_GENERATORS} and {TASKS}")
    release, lidc_root = Path(release), Path(lidc_root)
    for folder, what in ((release, "--release"), (lidc_root, "--lidc-root")):
        if not folder.is_dir():
            raise FileNotFoundError(f"{what} {folder} is not a folder")
    official = read_official_tables(tables_folder(release, tables))
    generators = [g for g in FAKE_GENERATORS if g in generators]
    config = {
        "source": "official",
        "release": str(release.resolve()),
        "lidc_root": str(lidc_root.resolve()),
        "generators": generators,
        "tasks": [t for t in TASKS if t in tasks],
        "limit": limit,
        "scans_per_shard": scans_per_shard,
        "command": "m3d import-official",
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = prepare_folder(out, config, overwrite=overwrite)
    jobs = official_jobs(official, lidc_root, tasks)
    jobs = jobs[:limit] if limit is not None else jobs
    folders = {
        (job.patient_id, job.series_instance_uid): lidc_root
        / official.dicom_folders[job.patient_id, job.series_instance_uid]
        for job in jobs
    }

    def examples(job: ScanJob):
        return official_examples(
            job, job.load(), release, official, generators, folders[job.patient_id, job.series_instance_uid]
        )

    write_shards(out, jobs, examples, config, scans_per_shard=scans_per_shard, progress=progress, state=state)
    finalize(out)
    return read_state(out)
