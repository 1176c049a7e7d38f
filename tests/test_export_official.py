"""`m3d export-official` on a tiny phantom build: the export has the official release's layout, the
official loader's crops of its rows land on the sites, and `m3d import-official` of the export (its DICOM
folder standing in for LIDC-IDRI) gives back the same examples."""

import csv
from pathlib import Path

import datasets
import numpy as np
import pytest
from official_loader import crop, fixed_crop_window, official_stack

from m3d.build import build_dataset
from m3d.cli import main as cli_main
from m3d.dataset_builder import ScanResolver, example_mask
from m3d.dataset_builder.features import folder_cache_dir
from m3d.dataset_builder.official import MODS, import_official, read_tiff_stack
from m3d.dataset_builder.official_export import export_official

GENERATORS = ("cyclegan", "ddpm")  # their release folders are named otherwise: cycle, diffusion
CROP = (8, 16, 16)  # an official test crop (z, y, x), smaller than the tiny scans


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_pipelines_dir, one_thread):
    """Three phantoms, one patient per split (seed 3 gives each of them sites), tiny random generators
    without the quality check."""
    out = tmp_path_factory.mktemp("build") / "m3dsynth"
    build_dataset(
        out,
        pipelines_dir=tiny_pipelines_dir,
        generators=GENERATORS,
        phantoms=3,
        size=64,
        max_slices=40,
        phantom_spacing="scaled",
        split_proportions={"train": 1, "val": 1, "test": 1},
        seed=3,
        num_inference_steps=1,
        quality=None,
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def exported(built, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "release"
    return out, export_official(built, out, progress=False)


def _examples(folder: Path, cache: Path) -> dict[str, tuple]:
    """img_id -> (split, example, whole scan, whole mask) of a dataset folder."""
    loaded = datasets.load_dataset(str(folder), cache_dir=str(folder_cache_dir(folder, cache)))
    found = {}
    for split, rows in loaded.items():
        scans = ScanResolver(rows)
        for row in rows:
            found[row["img_id"]] = (split, row, scans.volume(row), example_mask(row))
    return found


@pytest.fixture(scope="module")
def round_trip(built, exported, tmp_path_factory):
    release, _ = exported
    imported = tmp_path_factory.mktemp("imported") / "m3dsynth"
    import_official(release, release / "dicom", imported, progress=False)
    cache = tmp_path_factory.mktemp("cache")
    return _examples(built, cache), _examples(imported, cache)


def _table(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_layout_is_the_official_release(built, exported):
    release, summary = exported
    assert sorted(p.name for p in (release / "data").iterdir()) == ["LIDC.csv", "centers.csv", "data.csv", "sets.csv"]
    rows = _table(release / "data" / "data.csv")
    assert {row["mod"] for row in rows} == {"real", "cycle", "diffusion"}
    assert sum(row["mod"] != "real" for row in rows) == summary.fakes and summary.series == len(
        _table(release / "data" / "LIDC.csv")
    )
    centers = {(row["img_id"], row["mod"]) for row in _table(release / "data" / "centers.csv")}
    assert centers == {
        (row["img_id"], row["mod"]) for row in rows
    }  # the official loader merges them: none may be missing
    assert sorted(row["set"] for row in _table(release / "data" / "sets.csv")) == ["test", "train", "valid"]
    for row in rows:
        kinds = ("scan",) if row["mod"] == "real" else ("scan", "label")
        for kind in kinds:
            assert (release / row["mod"] / kind / row["img_id"] / "slide0000.tiff").is_file()
    linked = [p for p in (release / "real" / "scan").iterdir() if p.is_symlink()]
    assert len(linked) == summary.sites - summary.series  # one stack per series, as convert_real_to_tiff.py
    assert not list(release.parent.glob(".release.tmp-*"))


def test_import_of_the_export_gives_back_the_same_examples(round_trip):
    """HU and masks exactly, the same geometry, sites, test crops, splits, patients, series, generators and
    tasks; site_lps_mm within half a voxel (the tables hold whole voxels, as the release's)."""
    original, imported = round_trip
    assert sorted(imported) == sorted(original)
    for img_id, (split, row, volume, mask) in original.items():
        split_back, row_back, volume_back, mask_back = imported[img_id]
        assert split_back == split
        assert np.array_equal(volume_back.hu, volume.hu) and np.array_equal(mask_back, mask)
        assert np.allclose(volume_back.affine, volume.affine, atol=1e-4)
        for key in (
            "site_id",
            "label",
            "task",
            "generator",
            "patient_id",
            "series_instance_uid",
            "site_voxel_zyx",
            "test_crop_center_zyx",
            "base_img_id",
            "box_start_zyx",
            "scan_shape_zyx",
        ):
            assert row_back[key] == row[key], (img_id, key)
        assert row_back["spacing_mm"] == pytest.approx(row["spacing_mm"], abs=1e-5)
        half_voxel = np.abs(volume.direction * np.asarray(volume.spacing_mm)).sum(axis=1) / 2  # per LPS axis
        assert np.all(np.abs(np.subtract(row_back["site_lps_mm"], row["site_lps_mm"])) <= half_voxel + 1e-3)
        # the release has no nodule columns: import-official reads them from an LIDC XML, which the export lacks
        assert row_back["nodule_diameter_mm"] is None and row_back["malignancy_before"] is None


def test_official_crops_of_the_rows_land_on_the_sites(exported, round_trip):
    """The official loader's test crop around each row's (coord_z, coord_y, coord_x) is centred on the site's
    voxel, in the scan and in the label; every stack holds the official conversion of the exported DICOM
    (shifted HU, slices by descending z) wherever it is not tampered."""
    release, _ = exported
    original, _ = round_trip
    dicom = {row["sdir_id"]: release / "dicom" / row["dicom"] for row in _table(release / "data" / "LIDC.csv")}
    centre = tuple(n // 2 for n in CROP)
    sites_in_labels = 0
    for row in _table(release / "data" / "data.csv"):
        _, example, volume, mask = original[f"{row['img_id']}_{MODS[row['mod']]}"]
        site = tuple(example["site_voxel_zyx"])
        stack = read_tiff_stack(release / row["mod"] / "scan" / row["img_id"]).astype(np.int32)
        hu = stack - (int(stack.max()) - int(volume.hu.max()))  # the slices hold HU + a shift
        tampered = row["mod"] != "real"
        label = (
            read_tiff_stack(release / row["mod"] / "label" / row["img_id"]) if tampered else np.zeros(hu.shape, bool)
        )
        pristine = official_stack(dicom[row["sdir_id"]])
        assert np.array_equal(hu[~label], pristine[~label])
        starts = tuple(fixed_crop_window(int(row[f"coord_{axis}"]), n)[0] for axis, n in zip("zyx", CROP))
        assert crop(hu, starts, CROP)[centre] == volume.hu[site]
        assert crop(label, starts, CROP)[centre] == mask[site]
        sites_in_labels += int(mask[site])
    assert sites_in_labels > 0


def test_cli_refuses_a_non_empty_out_and_replaces_it_with_overwrite(built, tmp_path, capsys):
    out = tmp_path / "release"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli_main(["export-official", str(built), "--out", str(out), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--overwrite" in error and (out / "notes.txt").is_file()
    assert cli_main(["export-official", str(built), "--out", str(out), "--overwrite", "--no-progress"]) == 0
    assert (out / "data" / "data.csv").is_file() and not (out / "notes.txt").exists()


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert cli_main(["export-official", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "not an M3Dsynth dataset folder" in error
    assert cli_main(["export-official", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "would replace the dataset folder" in capsys.readouterr().err
