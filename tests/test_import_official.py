"""`m3d import-official` on a small release written in the official layout: a phantom LIDC-IDRI series
(DICOM + LIDC XML), its slices converted as the official code does (stored values shifted to be
non-negative, ordered by descending ImagePositionPatient z, one 16-bit TIFF per slice), fakes with a
changed ball and its label, and the four tables."""

import csv
import shutil
from pathlib import Path

import datasets
import numpy as np
import pydicom
import pytest
import tifffile

from m3d.cli import main as cli_main
from m3d.data.dicom import read_dicom_series
from m3d.data.lidc import group_nodules, read_lidc_xml
from m3d.data.phantom import make_phantom, write_phantom_case
from m3d.dataset_builder import example_mask, example_volume
from m3d.dataset_builder.official import import_official

OFFSET = 1024  # the release's shift of stored values (one of the official code's candidates)
FAKE_HU = {"inj": 60, "rem": -850}
RADIUS = 3


def _release_stack(dicom_folder: Path) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Stored values by descending z (as the official conversion), their z, and slope / intercept."""
    headers = [pydicom.dcmread(path) for path in sorted(dicom_folder.glob("*.dcm"))]
    headers.sort(key=lambda h: -float(h.ImagePositionPatient[2]))
    stored = np.stack([h.pixel_array.astype(np.int32) for h in headers])
    z_mm = np.array([float(h.ImagePositionPatient[2]) for h in headers])
    return stored, z_mm, float(headers[0].RescaleSlope), float(headers[0].RescaleIntercept)


def _write_stack(folder: Path, stack: np.ndarray) -> None:
    folder.mkdir(parents=True)
    for index, image in enumerate(stack):
        tifffile.imwrite(folder / f"slide{index:04d}.tiff", image, compression="lzma")


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A release with one removal site (a real nodule; pix2pix and cycle fakes) and one injection site
    (cycle only; diffusion is listed in data.csv but not downloaded)."""
    root = tmp_path_factory.mktemp("official")
    case = write_phantom_case(make_phantom(5, size=64, max_slices=40, n_nodules=(2, 3)), root / "lidc")
    series = case / "dicom"
    shutil.copy(case / "annotations.xml", series / "annotations.xml")  # LIDC-IDRI keeps the XML beside the slices
    volume = read_dicom_series(series)
    nodule = max(group_nodules(read_lidc_xml(series / "annotations.xml", volume)), key=lambda n: n.diameter_mm)
    stored, z_desc, slope, intercept = _release_stack(series)
    real = np.clip(stored + OFFSET, 0, None).astype(np.uint16)
    z_volume = np.array([volume.voxel_to_world((k, 0, 0))[2] for k in range(volume.shape[0])])

    sites = {"rem_7": np.rint(nodule.centroid_zyx).astype(int), "inj_3": np.array([volume.shape[0] // 2, 20, 20])}
    expected, rows, centers = {}, [], []
    release_dir = root / "release"
    for img_id, voxel in sites.items():
        task = img_id.split("_")[0]
        k = int(np.argmin(np.abs(z_desc - z_volume[voxel[0]])))  # the site's slice in the release's order
        release_zyx = (k, int(voxel[1]), int(voxel[2]))
        grid = np.indices(real.shape)
        ball = sum((g - c) ** 2 for g, c in zip(grid, release_zyx)) <= RADIUS**2
        fake = real.copy()
        fake[ball] = round((FAKE_HU[task] - intercept) / slope) + OFFSET
        mods = ["pix2pix", "cycle"] if task == "rem" else ["cycle"]
        for mod in mods:
            _write_stack(release_dir / mod / "scan" / img_id, fake)
            _write_stack(release_dir / mod / "label" / img_id, ball)
        volume_ball = ball[np.argsort(np.argsort(-z_volume))]  # release order -> volume order
        expected[img_id] = dict(
            voxel=voxel, ball=volume_ball, hu=np.where(volume_ball, FAKE_HU[task], volume.hu), task=task
        )
        for mod in ["real", *mods, *(["diffusion"] if task == "inj" else [])]:
            rows.append([img_id, task, mod, volume.metadata.patient_id, "3000611", *release_zyx])
            centers.append([img_id, mod, k + 1, 256.0, 256.0])
    data = release_dir / "data"
    data.mkdir()
    _write_csv(data / "data.csv", ["img_id", "ty", "mod", "orig_id", "sdir_id", "coord_z", "coord_y", "coord_x"], rows)
    _write_csv(data / "sets.csv", ["orig_id", "set"], [[volume.metadata.patient_id, "test"]])
    _write_csv(data / "centers.csv", ["img_id", "mod", "center_test_z", "center_test_y", "center_test_x"], centers)
    _write_csv(
        data / "LIDC.csv",
        ["orig_id", "sdir_id", "spacing_z", "spacing_y", "spacing_x", "dicom"],
        [[volume.metadata.patient_id, "3000611", *volume.spacing_mm, f"{case.name}/dicom"]],
    )
    return dict(release=release_dir, lidc=root / "lidc", volume=volume, nodule=nodule, expected=expected)


@pytest.fixture(scope="module")
def imported(release, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported") / "m3dsynth"
    state = import_official(release["release"], release["lidc"], out, progress=False)
    loaded = datasets.load_dataset(str(out), cache_dir=str(tmp_path_factory.mktemp("cache")))
    return out, state, {row["img_id"]: row for row in loaded["test"]}


def test_every_sample_becomes_an_example(imported):
    _, state, rows = imported
    assert sorted(rows) == sorted(["rem_7_real", "rem_7_pix2pix", "rem_7_cyclegan", "inj_3_real", "inj_3_cyclegan"])
    outcomes = [o for chunk in state.chunks.values() for o, n in chunk["outcomes"].items() for _ in range(n)]
    assert "ddpm/inject/skipped" in outcomes  # listed in data.csv, absent from the download


def test_fakes_are_the_release_values_in_hu_on_the_series_grid(imported, release):
    _, _, rows = imported
    volume = release["volume"]
    for img_id, row in rows.items():
        site = release["expected"][row["site_id"]]
        base = (
            rows[row["base_img_id"]] if row["base_img_id"] else None
        )  # a fake is its box over the site's pristine scan
        scan, mask = example_volume(row, base), example_mask(row)
        assert scan.shape == volume.shape and np.allclose(scan.affine, volume.affine, atol=1e-4)
        if img_id.endswith("_real"):
            assert (
                np.array_equal(scan.hu, volume.hu) and not mask.any() and row["label"] == 0 and row["generator"] == 0
            )
        else:
            assert np.array_equal(scan.hu, site["hu"]) and np.array_equal(mask, site["ball"]) and row["label"] == 1
        assert row["site_voxel_zyx"] == [int(v) for v in site["voxel"]]
        assert row["task"] == (1 if site["task"] == "rem" else 0)


def test_removal_site_gets_its_nodule_from_the_lidc_xml(imported, release):
    _, _, rows = imported
    nodule = release["nodule"]
    assert rows["rem_7_real"]["nodule_diameter_mm"] == pytest.approx(nodule.diameter_mm, rel=1e-5)
    assert rows["rem_7_pix2pix"]["malignancy_before"] == (
        None if nodule.malignancy is None else pytest.approx(nodule.malignancy)
    )


def test_wrong_lidc_series_is_refused(release, tmp_path):
    other = tmp_path / "lidc"
    case = write_phantom_case(make_phantom(6, size=64, max_slices=40, n_nodules=1), other)
    wrong = other / release["lidc"].joinpath(next(release["lidc"].iterdir()).name).name
    case.rename(wrong)  # another scan where the release expects its series
    with pytest.raises(ValueError, match="do not match|shape"):
        import_official(release["release"], other, tmp_path / "out", progress=False)


def test_cli_missing_tables_is_one_line(tmp_path, capsys):
    (tmp_path / "release").mkdir()
    (tmp_path / "lidc").mkdir()
    code = cli_main(
        [
            "import-official",
            "--release",
            str(tmp_path / "release"),
            "--lidc-root",
            str(tmp_path / "lidc"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2 and "data.csv" in capsys.readouterr().err
