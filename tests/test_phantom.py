"""The synthetic chest CT: determinism, tissue HU, nodules transplanted from real LIDC contours, I/O."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from m3d.data import lidc
from m3d.data.phantom import PhantomCase, generate_phantoms, make_phantom, write_phantom_case

SIZE, SLICES, SEED = 96, 40, 7


@pytest.fixture(scope="module")
def case() -> PhantomCase:
    return make_phantom(SEED, size=SIZE, max_slices=SLICES, n_nodules=(2, 3))


@pytest.fixture(scope="module")
def plain() -> PhantomCase:
    """The same seed without nodules: identical anatomy and noise (separate random streams)."""
    return make_phantom(SEED, size=SIZE, max_slices=SLICES, n_nodules=0)


def _roi_signature(scan) -> list:
    return [
        (
            a.nodule_id,
            a.reader,
            tuple(sorted(a.characteristics.items())),
            [(r.z_mm, r.inclusion, np.asarray(r.points_xy_px).round(3).tolist()) for r in a.rois],
        )
        for a in scan.annotations
    ]


def test_geometry_follows_a_real_lidc_scan(case):
    volume, scan = case.volume, case.lidc
    assert volume.hu.dtype == np.int16 and volume.shape == (SLICES, SIZE, SIZE)
    assert volume.hu.min() >= -1024 and volume.hu.max() <= 3071
    dz, dy, dx = volume.spacing_mm
    assert dy == dx == pytest.approx(scan.pixel_spacing_mm)
    assert 200.0 <= dx * SIZE <= 520.0  # the real field of view is kept
    z = np.asarray(scan.z_positions_mm)
    assert np.all(np.diff(z) > 0) and np.allclose(np.diff(z), dz, atol=1e-3)
    np.testing.assert_allclose([volume.voxel_to_world((k, 0, 0))[2] for k in range(SLICES)], z, atol=1e-6)
    assert volume.origin_mm[0] == pytest.approx(-dx * SIZE / 2)
    assert scan.patient_id == "M3D-PHANTOM-0007" and scan.rows == scan.columns == SIZE
    assert volume.metadata.series_instance_uid == scan.series_instance_uid
    assert case.geometry_series_uid.startswith("1.3.6.1.4.1.14519")  # a real LIDC series


def test_same_seed_same_case_and_different_seed_differs(case):
    again = make_phantom(SEED, size=SIZE, max_slices=SLICES, n_nodules=(2, 3))
    np.testing.assert_array_equal(again.volume.hu, case.volume.hu)
    np.testing.assert_array_equal(again.lung_mask, case.lung_mask)
    assert _roi_signature(again.lidc) == _roi_signature(case.lidc)
    assert again.lidc.series_instance_uid == case.lidc.series_instance_uid
    other = make_phantom(SEED + 1, size=SIZE, max_slices=SLICES, n_nodules=(2, 3))
    assert other.volume.shape != case.volume.shape or not np.array_equal(other.volume.hu, case.volume.hu)
    assert other.lidc.series_instance_uid != case.lidc.series_instance_uid


def test_tissue_classes_have_plausible_hu(case):
    hu = case.volume.hu.astype(np.float32)
    lung = case.lung_mask
    assert lung.sum() > 0.05 * lung.size
    assert np.median(hu[lung]) < -700
    corners = np.concatenate([hu[:, :4, :4].ravel(), hu[:, :4, -4:].ravel()])
    assert abs(np.median(corners) + 1000) < 30  # air outside the body
    assert (hu > 300).sum() > 50 and hu.max() > 500  # bone
    body = ndimage.binary_fill_holes(ndimage.binary_opening(hu > -500, iterations=1))
    soft = hu[body & ~ndimage.binary_dilation(lung, iterations=2)]
    hist, edges = np.histogram(soft, bins=np.arange(-300, 201, 10))
    fat_peak = edges[np.argmax(np.where(edges[:-1] < -20, hist, 0))] + 5
    tissue_peak = edges[np.argmax(np.where(edges[:-1] >= -20, hist, 0))] + 5
    assert -140 <= fat_peak <= -60, fat_peak
    assert 10 <= tissue_peak <= 80, tissue_peak
    # between the lungs (mediastinum) there is soft tissue and fat, not bone
    box = np.zeros_like(lung)
    box[:, int(0.3 * SIZE) : int(0.7 * SIZE), int(0.4 * SIZE) : int(0.6 * SIZE)] = True
    centre = hu[box & ~ndimage.binary_dilation(lung, iterations=1) & (hu > -500)]
    assert centre.size > 100 and -150 < np.median(centre) < 150


def test_nodules_sit_in_the_lungs_and_match_their_contours(case, plain):
    assert 2 <= len(case.nodules) <= 3 and len(case.source_series_uids) == len(case.nodules)
    np.testing.assert_array_equal(plain.lung_mask, case.lung_mask)
    assert not plain.lidc.annotations
    nodules = lidc.group_nodules(case.lidc)
    assert len(nodules) == len(case.nodules)
    lung_grown = ndimage.binary_dilation(case.lung_mask, iterations=2)
    diff = case.volume.hu.astype(np.float32) - plain.volume.hu.astype(np.float32)
    for nodule in nodules:
        mask = np.asarray(nodule.mask(case.volume.shape, consensus=0.5), dtype=bool)
        assert mask.any()
        assert np.all(lung_grown[mask]), "nodule outside the lungs"
        # where the HU were raised (anatomy and noise are identical without the nodule)
        near = ndimage.binary_dilation(mask, iterations=3)
        painted = (np.abs(diff) > 60) & near
        dice = 2 * (painted & mask).sum() / (painted.sum() + mask.sum())
        assert dice > 0.7, dice
        texture = np.median([a.characteristics.get("texture", 5) for a in nodule.annotations])
        ring = (
            ndimage.binary_dilation(mask, iterations=3) & ~ndimage.binary_dilation(mask, iterations=1) & case.lung_mask
        )
        inside = case.volume.hu[mask].astype(float).mean()
        around = np.median(case.volume.hu[ring]) if ring.any() else -850.0
        assert inside - around > (400 if texture >= 4 else 150)
    assert not np.any(diff[~ndimage.binary_dilation(case.nodule_mask, iterations=3)])


def test_nodules_keep_their_real_size(case):
    ps = case.volume.spacing_mm[1]
    phantom_nodules = lidc.group_nodules(case.lidc)
    db_scans = {}
    for record in case.nodules:
        uid = record["source_series_uid"]
        if uid not in db_scans:
            db_scans[uid] = _source_scan(uid)
        source = lidc.group_nodules(db_scans[uid])[record["source_nodule_index"]]
        assert source.diameter_mm == pytest.approx(record["source_diameter_mm"], abs=1e-2)
        centre = np.asarray(record["centre_zyx"])
        nodule = min(phantom_nodules, key=lambda n: np.linalg.norm(np.asarray(n.centroid_zyx) - centre))
        assert abs(nodule.diameter_mm - source.diameter_mm) <= 1.5 * ps, (nodule.diameter_mm, source.diameter_mm)
        assert sorted(a.characteristics.get("malignancy") for a in nodule.annotations if a.characteristics) == sorted(
            m for m in record["malignancy"] if m is not None
        )


def _source_scan(series_uid: str):
    return lidc.LIDCDatabase().scan(series_uid)


def test_write_read_round_trip(case, tmp_path):
    from m3d.data.dicom import read_dicom_series

    folder = write_phantom_case(case, tmp_path)
    assert folder == tmp_path / case.lidc.patient_id
    volume = read_dicom_series(folder / "dicom")
    np.testing.assert_array_equal(volume.hu, case.volume.hu)
    np.testing.assert_allclose(volume.spacing_mm, case.volume.spacing_mm, atol=1e-4)
    np.testing.assert_allclose(volume.origin_mm, case.volume.origin_mm, atol=1e-3)
    assert volume.metadata.series_instance_uid == case.lidc.series_instance_uid
    assert volume.metadata.patient_id == case.lidc.patient_id
    scan = lidc.read_lidc_xml(folder / "annotations.xml", volume)
    assert scan.series_instance_uid == case.lidc.series_instance_uid
    np.testing.assert_allclose(scan.z_positions_mm, case.lidc.z_positions_mm, atol=1e-3)
    assert len(scan.annotations) == len(case.lidc.annotations)
    before = sorted(np.round(np.asarray(n.centroid_zyx), 1).tolist() for n in lidc.group_nodules(case.lidc))
    after = sorted(np.round(np.asarray(n.centroid_zyx), 1).tolist() for n in lidc.group_nodules(scan))
    np.testing.assert_allclose(after, before, atol=0.6)
    # byte-identical output for the same seed
    again = write_phantom_case(make_phantom(SEED, size=SIZE, max_slices=SLICES, n_nodules=(2, 3)), tmp_path / "again")
    for path in sorted((folder / "dicom").iterdir()):
        assert path.read_bytes() == (again / "dicom" / path.name).read_bytes()
    assert (folder / "annotations.xml").read_bytes() == (again / "annotations.xml").read_bytes()


def test_generate_phantoms_resumes(tmp_path):
    folders = generate_phantoms(2, tmp_path, seed=3, size=48, max_slices=12, progress=False)
    assert [f.name for f in folders] == ["M3D-PHANTOM-0000", "M3D-PHANTOM-0001"]
    stamps = {p: p.stat().st_mtime_ns for f in folders for p in f.rglob("*") if p.is_file()}
    again = generate_phantoms(3, tmp_path, seed=3, size=48, max_slices=12, progress=False)
    assert again[:2] == folders and again[2].name == "M3D-PHANTOM-0002"
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert not list(tmp_path.glob(".*partial"))
