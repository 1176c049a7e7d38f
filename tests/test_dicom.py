import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file
from pydicom.uid import RLELossless

from m3d.data.ct import AXIAL_DIRECTION, CTMetadata, CTVolume
from m3d.data.dicom import DicomSeriesError, list_dicom_series, read_dicom_series, write_dicom_series


def make_volume(shape=(8, 24, 32), direction=AXIAL_DIRECTION, seed=0) -> CTVolume:
    rng = np.random.default_rng(seed)
    hu = rng.integers(-1024, 3000, shape).astype(np.int16)
    return CTVolume(hu, (2.5, 0.7, 0.8), (-120.5, -90.25, -310.0), direction, CTMetadata(patient_id="P1"))


def oblique() -> np.ndarray:
    a = np.deg2rad(15)
    rotation = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    return rotation @ AXIAL_DIRECTION


def assert_same(read: CTVolume, written: CTVolume) -> None:
    np.testing.assert_array_equal(read.hu, written.hu)
    np.testing.assert_allclose(read.spacing_mm, written.spacing_mm, atol=1e-5)
    np.testing.assert_allclose(read.origin_mm, written.origin_mm, atol=1e-4)
    np.testing.assert_allclose(read.direction, written.direction, atol=1e-5)


@pytest.mark.parametrize("direction", [AXIAL_DIRECTION, oblique(), AXIAL_DIRECTION * [[1], [1], [-1]] * [-1, 1, 1]])
def test_write_read_exact_round_trip(tmp_path, direction):
    volume = make_volume(direction=direction)
    files = write_dicom_series(volume, tmp_path / "series", uid_seed="t")
    assert len(files) == volume.shape[0]
    assert_same(read_dicom_series(tmp_path / "series"), volume)


def test_file_names_and_instance_numbers_do_not_decide_the_order(tmp_path):
    volume = make_volume()
    files = write_dicom_series(volume, tmp_path / "series")
    names = [f"x{n}.dcm" for n in random.Random(1).sample(range(100), len(files))]
    numbers = random.Random(2).sample(range(1, 50), len(files))
    for path, name, number in zip(files, names, numbers):
        dataset = pydicom.dcmread(path)
        dataset.InstanceNumber = number
        dataset.save_as(tmp_path / "series" / name)
        path.unlink()
    assert_same(read_dicom_series(tmp_path / "series"), volume)


def test_standard_reader_agrees(tmp_path):
    volume = make_volume(direction=oblique())
    write_dicom_series(volume, tmp_path / "series")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "series")))
    image = reader.Execute()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), volume.hu)
    np.testing.assert_allclose(image.GetSpacing(), volume.spacing_mm[::-1], atol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), volume.origin_mm, atol=1e-4)
    itk_direction = np.array(image.GetDirection()).reshape(3, 3)  # columns: index x, y, z
    np.testing.assert_allclose(itk_direction, volume.direction[:, ::-1], atol=1e-5)


def test_written_files_are_valid_ct_image_storage(tmp_path):
    write_dicom_series(make_volume(), tmp_path / "series")
    config = pydicom.config.settings
    previous = config.reading_validation_mode
    config.reading_validation_mode = pydicom.config.RAISE
    try:
        for path in sorted((tmp_path / "series").iterdir()):
            dataset = pydicom.dcmread(path, force=False)
            assert dataset.SOPClassUID == pydicom.uid.CTImageStorage
            for keyword in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
                            "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "RescaleIntercept"):
                assert keyword in dataset
    finally:
        config.reading_validation_mode = previous


def test_derived_series_keeps_source_tags_with_new_uids(tmp_path):
    source = make_volume()
    write_dicom_series(source, tmp_path / "source")
    original = read_dicom_series(tmp_path / "source")
    tampered = original.with_hu(original.hu + 1)
    write_dicom_series(tampered, tmp_path / "derived", series_description="tampered")
    derived = read_dicom_series(tmp_path / "derived")
    assert_same(derived, tampered)
    assert derived.metadata.patient_id == original.metadata.patient_id
    assert derived.metadata.study_instance_uid == original.metadata.study_instance_uid
    assert derived.metadata.series_instance_uid != original.metadata.series_instance_uid
    source_sops = {h.SOPInstanceUID for h in original.metadata.source_headers}
    assert not source_sops & {h.SOPInstanceUID for h in derived.metadata.source_headers}
    assert "DERIVED" in derived.metadata.source_headers[0].ImageType


def test_same_uid_seed_gives_same_bytes(tmp_path):
    volume = make_volume()
    first = write_dicom_series(volume, tmp_path / "a", uid_seed="seed")
    second = write_dicom_series(volume, tmp_path / "b", uid_seed="seed")
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


def test_refuses_to_overwrite(tmp_path):
    write_dicom_series(make_volume(), tmp_path / "series")
    with pytest.raises(DicomSeriesError, match="not empty"):
        write_dicom_series(make_volume(), tmp_path / "series")
    write_dicom_series(make_volume(seed=1), tmp_path / "series", overwrite=True)


def test_pydicom_ct_small_reads_with_rescale(tmp_path):
    path = Path(get_testdata_file("CT_small.dcm"))
    shutil.copy(path, tmp_path / "ct.dcm")
    volume = read_dicom_series(tmp_path)
    dataset = pydicom.dcmread(path)
    expected = dataset.pixel_array * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    np.testing.assert_array_equal(volume.hu[0], expected.astype(np.int16))
    np.testing.assert_allclose(volume.origin_mm, [float(v) for v in dataset.ImagePositionPatient])
    np.testing.assert_allclose(volume.spacing_mm[1:], [float(v) for v in dataset.PixelSpacing])
    assert volume.metadata.modality == "CT" and volume.shape == (1, 128, 128)


def test_rle_compressed_series_is_decoded(tmp_path):
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    expected = dataset.pixel_array.copy()
    dataset.compress(RLELossless)
    dataset.save_as(tmp_path / "rle.dcm")
    volume = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(volume.hu[0], expected * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept))


def test_missing_decoder_names_the_plugin(tmp_path):
    dataset = pydicom.dcmread(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))
    dataset.Modality = "CT"
    dataset.save_as(tmp_path / "jls.dcm")
    with pytest.raises(DicomSeriesError, match="pip install pylibjpeg"):
        read_dicom_series(tmp_path)


def test_non_ct_and_non_dicom_files(tmp_path):
    write_dicom_series(make_volume(), tmp_path / "scan")
    shutil.copy(get_testdata_file("MR_small.dcm"), tmp_path / "scan" / "mr.dcm")
    (tmp_path / "scan" / "notes.txt").write_text("not dicom")
    with pytest.warns(UserWarning) as record:
        volume = read_dicom_series(tmp_path / "scan")
    messages = " ".join(str(w.message) for w in record)
    assert "not DICOM" in messages and "non-CT" in messages
    assert volume.shape == (8, 24, 32)
    only_mr = tmp_path / "mr"
    only_mr.mkdir()
    shutil.copy(get_testdata_file("MR_small.dcm"), only_mr / "mr.dcm")
    with pytest.raises(DicomSeriesError, match="no CT series"):
        read_dicom_series(only_mr)


def test_several_series_are_listed_then_chosen(tmp_path):
    write_dicom_series(make_volume(seed=0), tmp_path / "both" / "a")
    write_dicom_series(make_volume(seed=1), tmp_path / "both" / "b")
    series = list_dicom_series(tmp_path / "both")
    assert len(series) == 2
    with pytest.raises(DicomSeriesError, match=series[0].series_instance_uid):
        read_dicom_series(tmp_path / "both")
    chosen = read_dicom_series(tmp_path / "both", series[1].series_instance_uid)
    assert chosen.metadata.series_instance_uid == series[1].series_instance_uid


def test_missing_slice_errors_or_resamples(tmp_path):
    volume = make_volume()
    files = write_dicom_series(volume, tmp_path / "series")
    files[3].unlink()
    with pytest.raises(DicomSeriesError, match="resample"):
        read_dicom_series(tmp_path / "series")
    with pytest.warns(UserWarning, match="resampled"):
        resampled = read_dicom_series(tmp_path / "series", on_uneven="resample")
    assert resampled.shape == volume.shape and resampled.spacing_mm[0] == pytest.approx(2.5)
    np.testing.assert_array_equal(resampled.hu[4:], volume.hu[4:])
    np.testing.assert_array_equal(resampled.hu[3], ((volume.hu[2].astype(float) + volume.hu[4]) / 2).round())


def test_duplicate_slice_is_dropped(tmp_path):
    volume = make_volume()
    files = write_dicom_series(volume, tmp_path / "series")
    shutil.copy(files[2], tmp_path / "series" / "copy.dcm")
    with pytest.warns(UserWarning, match="duplicates"):
        assert_same(read_dicom_series(tmp_path / "series"), volume)


def test_padding_value_becomes_air(tmp_path):
    write_dicom_series(make_volume(), tmp_path / "series")
    path = sorted((tmp_path / "series").iterdir())[0]
    dataset = pydicom.dcmread(path)
    pixels = dataset.pixel_array.copy()
    pixels[0, :5] = -2000
    dataset.PixelData = pixels.tobytes()
    dataset.add_new(0x00280120, "SS", -2000)  # PixelPaddingValue
    dataset.save_as(path)
    volume = read_dicom_series(tmp_path / "series")
    assert (volume.hu[0, 0, :5] == -1024).all()


@pytest.mark.parametrize("make", ["missing", "file", "empty"])
def test_bad_folders(tmp_path, make):
    target = tmp_path / "x"
    if make == "file":
        target.write_text("hello")
    elif make == "empty":
        target.mkdir()
    with pytest.raises(DicomSeriesError):
        read_dicom_series(target)
