"""Write an M3Dsynth dataset folder in the official release's layout (`m3d export-official`), the inverse
of `m3d import-official` (`m3d.dataset_builder.official`).

``OUT/<mod>/scan/<img_id>/slide%04d.tiff`` holds each tampered scan (``<mod>``: ``pix2pix``, ``cycle``,
``diffusion``) and ``OUT/<mod>/label/<img_id>/`` its boolean ground truth; ``OUT/real/scan/<img_id>/`` the
pristine scan of each site, as the official ``convert_real_to_tiff.py`` leaves it (one stack per series,
the series' other sites symbolic links to it). ``<img_id>`` is the site id, shared by a site's pristine
scan and fakes as in the release. Slices are ordered by descending ImagePositionPatient z and hold the
stored values of the series' DICOM (int16 HU, slope 1, intercept 0) shifted to be non-negative, as the
official conversion does: ``HU + shift`` with ``shift`` the series' lowest HU (pristine and fakes)
negated (0 if none is negative), so every HU is kept exactly and the lowest value (air or padding) is 0,
which the official loader leaves out of its intensity percentiles. Stacks are LZMA-compressed as the
release's (about 0.25 s per 512 x 512 CT slice on one core).

``OUT/data/`` holds the tables: ``data.csv`` (a row per example, its site in the release's convention,
slices by descending z; ``sdir_id`` the SeriesInstanceUID, as `m3d plan` writes it), ``sets.csv`` (the
split of each patient), ``centers.csv`` (the fixed test-crop centres) and ``LIDC.csv`` (each series'
DICOM folder). ``OUT/dicom/<patient>/<series>/`` is the pristine series written as DICOM: the release is
made from LIDC-IDRI and `m3d import-official` takes HU and geometry from that download, so the export
ships the series in its place; ``m3d import-official --release OUT --lidc-root OUT/dicom`` gives back the
same examples. The release has no nodule size or malignancy columns (import-official reads them from the
LIDC XML beside the series, which an M3Dsynth folder does not hold), so they come back empty.
"""

from __future__ import annotations

import csv
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..constants import GENERATORS
from ..data.ct import CTVolume
from ..data.dicom import publish_folder, write_dicom_series
from ..tamper.plan import DATA_CSV_COLUMNS, GENERATOR_CODES, OFFICIAL_TASK, SETS_CSV_COLUMNS
from .features import FEATURES, ScanResolver, example_mask, folder_cache_dir, stored_volume
from .official import CENTERS_CSV_COLUMNS, release_order, write_tiff_stack

DICOM_FOLDER = "dicom"  # OUT/dicom/<patient>/<series>/: the pristine series, in place of the LIDC-IDRI download
TABLES_FOLDER = "data"  # where import-official looks for the tables by default
LIDC_CSV_COLUMNS = ("orig_id", "sdir_id", "spacing_z", "spacing_y", "spacing_x", "dicom")
RELEASE_SETS = {"train": "train", "validation": "valid", "test": "test"}  # FEATURES split -> the release's sets.csv
ROW_COLUMNS = [
    "img_id",
    "site_id",
    "generator",
    "task",
    "patient_id",
    "series_instance_uid",
    "site_voxel_zyx",
    "test_crop_center_zyx",
]


@dataclass
class ExportSummary:
    """What `export_official` wrote: the folder and how many series, sites and tampered scans it holds."""

    folder: Path
    series: int
    sites: int
    fakes: int


@dataclass
class _Series:
    """The examples of one series in one split: their fields (`ROW_COLUMNS`, names for class labels, and
    ``index``, the row in ``split``) grouped by site, in the split's order."""

    patient_id: str
    series_instance_uid: str
    split_name: str
    split: Any = field(repr=False)
    scans: ScanResolver = field(repr=False)
    sites: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


@dataclass
class _Tables:
    """The rows of the four tables, filled series by series."""

    data: list[list] = field(default_factory=list)
    centers: list[list] = field(default_factory=list)
    lidc: list[list] = field(default_factory=list)
    sets: dict[str, str] = field(default_factory=dict)  # patient -> the release's set name


def _plain_name(text: str, what: str) -> str:
    """``text`` if it can name a folder of the release (no separator, not ``.`` or ``..``); a ValueError otherwise."""
    if not text or "/" in text or "\\" in text or text in (".", ".."):
        raise ValueError(f"the {what} {text!r} cannot name a folder of the release")
    return text


def _load_folder(data: Path):
    """The dataset folder ``data`` as a ``DatasetDict`` (cached under `folder_cache_dir`)."""
    import datasets

    if not (data / "data").is_dir():
        raise FileNotFoundError(
            f"{data} is not an M3Dsynth dataset folder (no data/ shards): make one with m3d build "
            "or m3d import-official"
        )
    dataset = datasets.load_dataset(str(data), cache_dir=str(folder_cache_dir(data)))
    for name, split in dataset.items():
        if name not in RELEASE_SETS:
            raise ValueError(f"{data} has a split {name!r}; the release knows {', '.join(RELEASE_SETS)}")
        if split.features != FEATURES:
            raise ValueError(
                f"the {name} split of {data} does not have the M3Dsynth columns (m3d.dataset_builder.FEATURES)"
            )
    return dataset


def _series_of(dataset) -> list[_Series]:
    """The dataset's examples grouped by series (first appearance order); a ValueError for a patient in two
    splits or a site id in two series, which the release's tables cannot hold."""
    found: dict[tuple[str, str], _Series] = {}
    site_series: dict[str, tuple[str, str]] = {}
    splits: dict[str, str] = {}
    for split_name, split in dataset.items():
        scans = ScanResolver(split)
        for index, row in enumerate(split.select_columns(ROW_COLUMNS).to_list()):
            row.update(
                index=index,
                generator=FEATURES["generator"].int2str(row["generator"]),
                task=FEATURES["task"].int2str(row["task"]),
            )
            patient, uid, site_id = (
                _plain_name(row[key], key.replace("_", " "))
                for key in ("patient_id", "series_instance_uid", "site_id")
            )
            if splits.setdefault(patient, split_name) != split_name:
                raise ValueError(
                    f"patient {patient} is in the {splits[patient]} and {split_name} splits: the release "
                    "splits by patient"
                )
            if site_series.setdefault(site_id, (patient, uid)) != (patient, uid):
                raise ValueError(f"site {site_id} is on two series ({site_series[site_id][1]} and {uid})")
            series = found.setdefault((patient, uid), _Series(patient, uid, split_name, split, scans))
            series.sites.setdefault(site_id, []).append(row)
    if not found:
        raise ValueError("the dataset holds no examples")
    return list(found.values())


def _pristine_scan(series: _Series) -> CTVolume:
    """The series' scan: its sites' pristine examples, checked to be one and the same."""
    pristine = []
    for site_id, rows in series.sites.items():
        row = next((row for row in rows if row["generator"] == "real"), None)
        if row is None:
            raise ValueError(
                f"site {site_id} has no pristine example ({site_id}_real): export the whole dataset folder"
            )
        pristine.append(row)
    scan = series.scans.volume(series.split[pristine[0]["index"]])
    for row in pristine[1:]:
        other = series.scans.volume(series.split[row["index"]])
        if (
            other.shape != scan.shape
            or not np.array_equal(other.hu, scan.hu)
            or not np.allclose(other.affine, scan.affine, atol=1e-4)
        ):
            raise ValueError(
                f"the pristine examples {pristine[0]['img_id']} and {row['img_id']} of series "
                f"{series.series_instance_uid} differ: the release holds one scan per series"
            )
    return scan


def _export_series(series: _Series, root: Path, tables: _Tables) -> int:
    """Write one series' DICOM and TIFF stacks under ``root`` and add its table rows; returns its fakes."""
    patient, uid = series.patient_id, series.series_instance_uid
    scan = _pristine_scan(series)
    fakes = [row for rows in series.sites.values() for row in rows if row["generator"] != "real"]
    lowest = min([int(scan.hu.min())] + [int(stored_volume(series.split[row["index"]]).hu.min()) for row in fakes])
    shift = max(0, -lowest)
    order = release_order(scan)
    release_slice = np.argsort(order)  # release_slice[v]: the release's slice k of volume slice v

    def release_zyx(zyx: Sequence[int]) -> list[int]:
        return [int(release_slice[zyx[0]]), int(zyx[1]), int(zyx[2])]

    def stored(hu: np.ndarray) -> np.ndarray:
        return (hu[order].astype(np.int32) + shift).astype(np.uint16)

    # the pristine pixels as they are: the series keeps its UID, which names it in the tables (sdir_id) and
    # in the examples import-official makes
    write_dicom_series(
        replace(scan, metadata=replace(scan.metadata, patient_id=patient)),
        root / DICOM_FOLDER / patient / uid,
        series_description="m3d export-official: pristine series",
        series_instance_uid=uid,
        uid_seed=uid,
    )
    tables.lidc.append([patient, uid, *scan.spacing_mm, f"{patient}/{uid}"])
    tables.sets[patient] = RELEASE_SETS[series.split_name]
    first_site = next(iter(series.sites))
    for site_id, rows in series.sites.items():
        real_scan = root / "real" / "scan" / site_id
        if site_id == first_site:
            write_tiff_stack(real_scan, stored(scan.hu))
        else:
            real_scan.symlink_to(first_site, target_is_directory=True)
        for row in sorted(rows, key=lambda entry: GENERATORS.index(entry["generator"])):
            mod = GENERATOR_CODES[row["generator"]]
            if row["generator"] != "real":
                example = series.split[row["index"]]
                write_tiff_stack(root / mod / "scan" / site_id, stored(series.scans.volume(example).hu))
                write_tiff_stack(root / mod / "label" / site_id, example_mask(example)[order])
            tables.data.append(
                [site_id, OFFICIAL_TASK[row["task"]], mod, patient, uid, *release_zyx(row["site_voxel_zyx"])]
            )
            tables.centers.append([site_id, mod, *release_zyx(row["test_crop_center_zyx"])])
    return len(fakes)


def _write_table(path: Path, columns: Sequence[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)


def export_official(
    data: str | Path, out: str | Path, *, overwrite: bool = False, progress: bool = True
) -> ExportSummary:
    """Write the dataset folder ``data`` (`m3d build`, `m3d import-official`) in the official release layout
    into ``out`` (see the module doc), built in a hidden sibling folder and renamed at the end. ``out`` must be
    new or an empty folder, unless ``overwrite``."""
    from tqdm.auto import tqdm

    data, out = Path(data), Path(out)
    if out.resolve() == data.resolve() or out.resolve() in data.resolve().parents:
        raise ValueError(f"--out {out} would replace the dataset folder {data}: choose another folder")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    all_series = _series_of(_load_folder(data))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    tables, fakes = _Tables(), 0
    try:
        for series in tqdm(all_series, desc="export-official", unit="series", disable=not progress):
            fakes += _export_series(series, staging, tables)
        folder = staging / TABLES_FOLDER
        _write_table(folder / "data.csv", DATA_CSV_COLUMNS, tables.data)
        _write_table(folder / "sets.csv", SETS_CSV_COLUMNS, [list(item) for item in tables.sets.items()])
        _write_table(folder / "centers.csv", CENTERS_CSV_COLUMNS, tables.centers)
        _write_table(folder / "LIDC.csv", LIDC_CSV_COLUMNS, tables.lidc)
        publish_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportSummary(out, len(all_series), sum(len(series.sites) for series in all_series), fakes)
