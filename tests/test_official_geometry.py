"""Where an official-format site lands, whichever way the series runs: slices stored by ascending or by
descending ImagePositionPatient z, or feet-first (PatientPosition FFS: image rows along LPS -x, so the
slice normal is -z and m3d reads the slices by descending z). A site planned by `m3d plan` and written in
the release's convention is read back by import-official's reader at the nodule's physical point, and the
official loader's crop of that row (tests/official_loader.py) is centred on the nodule; a row naming the
nodule's voxel of the official stack is read back at that point too."""

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest
from official_loader import crop, fixed_crop_window, jitter_of, official_stack, random_crop_starts

from m3d.data.ct import CTVolume
from m3d.data.dicom import write_dicom_series
from m3d.data.lidc import Annotation, ContourROI, LIDCScan
from m3d.dataset_builder.official import CENTERS_CSV_COLUMNS, official_examples, official_jobs, read_official_tables
from m3d.dataset_builder.official_export import LIDC_CSV_COLUMNS
from m3d.tamper.plan import DATA_CSV_COLUMNS, SETS_CSV_COLUMNS, PlanCriteria, plan_sites, write_plan_csv

N_SLICES, SIZE = 12, 24
SPACING = (2.5, 0.75, 0.75)  # (z, y, x) mm
ORIGIN = (-10.0, -20.0, -100.0)  # LPS (x, y, z) of the first voxel of the ascending series
NODULE = (7, 9, 15)  # the nodule in the ascending series: slice (by ascending z), row, column
MARK_HU, BACKGROUND_HU = 900, -800
PATIENT = "LIDC-IDRI-9001"
CROP = (8, 16, 16)  # an official crop (z, y, x)
# LPS directions of the array axes (slice, row, column); the same slab of space in each
GEOMETRIES = {
    "ascending": ((0, 0, 1), (0, 1, 0), (1, 0, 0)),
    "descending": ((0, 0, -1), (0, 1, 0), (1, 0, 0)),
    "feet-first": ((0, 0, -1), (0, 1, 0), (-1, 0, 0)),
}


def _write_csv(path: Path, columns, rows) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)


@pytest.fixture(scope="module", params=list(GEOMETRIES))
def series(request, tmp_path_factory):
    """The series written as DICOM in one geometry, a bright voxel at the nodule; its nodule as the
    annotation database holds it (pixel rows and columns as stored, slices by ascending z); the nodule's
    LPS point."""
    ascending = CTVolume(np.zeros((N_SLICES, SIZE, SIZE), np.int16), SPACING, ORIGIN)
    direction = np.column_stack(GEOMETRIES[request.param]).astype(float)
    flipped = direction[:, 0][2] < 0, direction[:, 2][0] < 0  # slice axis and column axis run backwards
    first = (N_SLICES - 1 if flipped[0] else 0, 0, SIZE - 1 if flipped[1] else 0)
    volume = CTVolume(
        np.full((N_SLICES, SIZE, SIZE), BACKGROUND_HU, np.int16),
        SPACING,
        tuple(ascending.voxel_to_world(first)),
        direction,
    )
    point = ascending.voxel_to_world(NODULE)
    mark = tuple(int(v) for v in np.rint(volume.world_to_voxel(point)))
    volume.hu[mark] = MARK_HU
    root = tmp_path_factory.mktemp(request.param)
    folder = root / "lidc" / PATIENT / "series"
    write_dicom_series(volume, folder, uid_seed=request.param)
    if request.param == "feet-first":
        for path in folder.glob("*.dcm"):
            header = pydicom.dcmread(path)
            header.PatientPosition = "FFS"
            header.save_as(path)
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in sorted(folder.glob("*.dcm"))]
    z_positions = [float(header.ImagePositionPatient[2]) for header in headers]
    row, column = mark[1], mark[2]
    square = np.array(
        [[column - 2, row - 2], [column + 2, row - 2], [column + 2, row + 2], [column - 2, row + 2]], float
    )
    rois = [ContourROI(point[2] + dz * SPACING[0], square) for dz in (-1, 0, 1)]  # 3 x 3 pixels on 3 slices
    scan = LIDCScan(
        PATIENT,
        str(headers[0].SeriesInstanceUID),
        "",
        SPACING[0],
        SPACING[1],
        z_positions,
        [Annotation("1", "reader", rois, {"malignancy": 2})],
        rows=SIZE,
        columns=SIZE,
    )
    return dict(root=root, folder=folder, scan=scan, point=point, mark=mark, geometry=request.param)


def _read_back(series, rows: list[list]) -> dict:
    """The pristine example import-official makes for a data.csv of ``rows`` on the series."""
    tables = series["root"] / f"tables-{len(list(series['root'].glob('tables-*')))}"
    tables.mkdir()
    _write_csv(tables / "data.csv", DATA_CSV_COLUMNS, rows)
    _write_csv(tables / "sets.csv", SETS_CSV_COLUMNS, [[PATIENT, "test"]])
    _write_csv(tables / "centers.csv", CENTERS_CSV_COLUMNS, [])
    uid = series["scan"].series_instance_uid
    _write_csv(tables / "LIDC.csv", LIDC_CSV_COLUMNS, [[PATIENT, uid, *SPACING, f"{PATIENT}/series"]])
    official = read_official_tables(tables)
    [job] = official_jobs(official, series["root"] / "lidc")
    volume = job.load()
    [(example, _)] = official_examples(job, volume, tables, official, generators=())
    example["hu_at_site"] = int(volume.hu[tuple(example["site_voxel_zyx"])])
    return example


def _check_at_the_nodule(example: dict, point: np.ndarray) -> None:
    assert example["hu_at_site"] == MARK_HU
    half_voxel = np.array([SPACING[2], SPACING[1], SPACING[0]]) / 2  # LPS x, y, z of an axial grid
    assert np.all(np.abs(np.asarray(example["site_lps_mm"]) - point) <= half_voxel + 1e-3)


def test_a_planned_site_is_read_back_at_the_nodule_and_cropped_there(series, tmp_path):
    """`m3d plan` writes slice n - 1 - k for the nodule at ascending slice k; the official loader reads that
    index straight into the slide%04d stack (descending z), so its crops are centred on the nodule."""
    [site] = plan_sites([series["scan"]], PlanCriteria(fit_in_scan=False), seed=0)
    assert site.task == "inject" and np.allclose(site.center_zyx, (NODULE[0], *series["mark"][1:]))
    with open(write_plan_csv([site], tmp_path / "data.csv", generators=("real",)), newline="") as handle:
        [row] = list(csv.DictReader(handle))
    coord = tuple(int(row[f"coord_{axis}"]) for axis in "zyx")
    assert coord[0] == N_SLICES - 1 - NODULE[0]
    _check_at_the_nodule(_read_back(series, [list(row.values())]), series["point"])
    stack = official_stack(series["folder"])
    starts = tuple(fixed_crop_window(c, n)[0] for c, n in zip(coord, CROP))
    assert crop(stack, starts, CROP)[tuple(n // 2 for n in CROP)] == MARK_HU  # the test crop's centre
    for axis, (c, n) in enumerate(zip(coord, CROP)):  # every training crop holds it
        for start in random_crop_starts(stack.shape[axis], c, n, jitter_of(n)):
            assert start <= c < start + n


def test_a_row_at_the_nodule_of_the_official_stack_is_read_back_there(series):
    """A release row names the nodule's voxel of the official stack (slices by descending z, pixels as
    stored); import-official's reader puts the site on the nodule's physical point."""
    stack = official_stack(series["folder"])
    [coord] = np.argwhere(stack == MARK_HU).tolist()
    uid = series["scan"].series_instance_uid
    example = _read_back(series, [["inj_1", "inj", "real", PATIENT, uid, *coord]])
    _check_at_the_nodule(example, series["point"])
