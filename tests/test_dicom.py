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


# slices stacked towards the feet, rows towards anterior: right-handed, so the slice normal of the files
# (row x column) is the stacking direction and the array comes back as it was written
DESCENDING = np.array([[0.0, 0.0, 1.0], [0.0, -1.0, 0.0], [-1.0, 0.0, 0.0]])
# slices stacked towards the feet with the usual rows and columns: left-handed, read back reversed
DESCENDING_LEFT_HANDED = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])


def assert_same(read: CTVolume, written: CTVolume) -> None:
    np.testing.assert_array_equal(read.hu, written.hu)
    np.testing.assert_allclose(read.spacing_mm, written.spacing_mm, atol=1e-5)
    np.testing.assert_allclose(read.origin_mm, written.origin_mm, atol=1e-4)
    np.testing.assert_allclose(read.direction, written.direction, atol=1e-5)


@pytest.mark.parametrize("direction", [AXIAL_DIRECTION, oblique(), DESCENDING], ids=["axial", "oblique", "descending"])
def test_write_read_exact_round_trip(tmp_path, direction):
    volume = make_volume(direction=direction)
    files = write_dicom_series(volume, tmp_path / "series", uid_seed="t")
    assert len(files) == volume.shape[0]
    read = read_dicom_series(tmp_path / "series")
    assert_same(read, volume)
    headers = read.metadata.source_headers
    assert len(headers) == volume.shape[0] and all("PixelData" not in h for h in headers)
    assert [h.InstanceNumber for h in headers] == list(range(1, volume.shape[0] + 1))


def test_left_handed_stack_reads_back_in_normal_order_at_the_same_place(tmp_path):
    volume = make_volume(direction=DESCENDING_LEFT_HANDED)
    write_dicom_series(volume, tmp_path / "series")
    read = read_dicom_series(tmp_path / "series")
    np.testing.assert_array_equal(read.hu, volume.hu[::-1])
    np.testing.assert_allclose(read.origin_mm, volume.voxel_to_world((volume.shape[0] - 1, 0, 0)), atol=1e-4)
    np.testing.assert_allclose(read.direction, volume.direction * [-1, 1, 1], atol=1e-6)
    np.testing.assert_allclose(
        read.voxel_to_world((2, 5, 7)), volume.voxel_to_world((volume.shape[0] - 3, 5, 7)), atol=1e-4
    )


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


@pytest.mark.parametrize("direction", [oblique(), DESCENDING], ids=["oblique", "descending"])
def test_standard_reader_agrees(tmp_path, direction):
    volume = make_volume(direction=direction)
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
            for keyword in (
                "PatientID",
                "StudyInstanceUID",
                "SeriesInstanceUID",
                "FrameOfReferenceUID",
                "ImagePositionPatient",
                "ImageOrientationPatient",
                "PixelSpacing",
                "RescaleIntercept",
            ):
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
    assert (
        derived.metadata.source_headers[0].FrameOfReferenceUID
        == original.metadata.source_headers[0].FrameOfReferenceUID
    )
    assert derived.metadata.description == "tampered"


def test_source_headers_outlive_the_source_files(tmp_path):
    files = write_dicom_series(make_volume(), tmp_path / "source")
    for path in files:  # a large private element: the header scan defers it like the pixel data
        dataset = pydicom.dcmread(path)
        dataset.add_new(0x00291010, "OB", bytes(200_000))
        dataset.save_as(path)
    original = read_dicom_series(tmp_path / "source")
    shutil.rmtree(tmp_path / "source")
    write_dicom_series(original, tmp_path / "derived")
    derived = pydicom.dcmread(tmp_path / "derived" / "0000.dcm")
    assert derived[0x00291010].value == bytes(200_000)


def test_same_uid_seed_gives_same_bytes(tmp_path):
    volume = make_volume()
    first = write_dicom_series(volume, tmp_path / "a", uid_seed="seed")
    second = write_dicom_series(volume, tmp_path / "b", uid_seed="seed")
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


def test_refuses_to_overwrite(tmp_path):
    write_dicom_series(make_volume(), tmp_path / "series", filename_pattern="old{index}.dcm")
    with pytest.raises(DicomSeriesError, match="overwrite=True"):
        write_dicom_series(make_volume(), tmp_path / "series")
    replacement = make_volume(seed=1)
    write_dicom_series(replacement, tmp_path / "series", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "series").iterdir()) == [f"{i:04d}.dcm" for i in range(8)]
    assert_same(read_dicom_series(tmp_path / "series"), replacement)
    assert [p.name for p in tmp_path.iterdir()] == ["series"]  # no staging or old folders left behind
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("mine")
    with pytest.raises(DicomSeriesError, match="notes.txt"):  # never deletes what is not a DICOM file
        write_dicom_series(replacement, tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "notes.txt").read_text() == "mine"


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
    np.testing.assert_array_equal(
        volume.hu[0], expected * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    )


def test_jpeg2000_ct_with_padding_is_decoded(tmp_path):
    path = Path(get_testdata_file("693_J2KI.dcm"))  # a real CT slice: JPEG 2000, 14 bits, padding -2000
    shutil.copy(path, tmp_path / "j2k.dcm")
    volume = read_dicom_series(tmp_path)
    dataset = pydicom.dcmread(path)
    stored = dataset.pixel_array
    expected = np.where(
        stored == dataset.PixelPaddingValue, -1024, stored * int(dataset.RescaleSlope) + int(dataset.RescaleIntercept)
    )
    assert (stored == dataset.PixelPaddingValue).any()
    np.testing.assert_array_equal(volume.hu[0], expected)


@pytest.mark.parametrize(
    "name",
    ["MR_small_jpeg_ls_lossless.dcm", "JPEG-lossy.dcm"],
    ids=["jpeg-ls (no plugin)", "12-bit jpeg (pillow cannot)"],
)
def test_missing_decoder_names_the_plugin(tmp_path, name):
    dataset = pydicom.dcmread(get_testdata_file(name))
    dataset.Modality = "CT"
    dataset.ImagePositionPatient = [0, 0, 0]
    dataset.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    dataset.save_as(tmp_path / "compressed.dcm")
    with pytest.raises(DicomSeriesError, match="pip install pylibjpeg pylibjpeg-libjpeg") as error:
        read_dicom_series(tmp_path)
    assert dataset.file_meta.TransferSyntaxUID.name in str(error.value)


def test_non_ct_and_non_dicom_files(tmp_path):
    write_dicom_series(make_volume(), tmp_path / "scan")
    shutil.copy(get_testdata_file("MR_small.dcm"), tmp_path / "scan" / "mr.dcm")
    (tmp_path / "scan" / "notes.txt").write_text("not dicom")
    with pytest.warns(UserWarning) as record:
        volume = read_dicom_series(tmp_path / "scan")
    messages = " ".join(str(w.message) for w in record)
    assert "not DICOM" in messages and "non-CT" in messages
    assert volume.shape == (8, 24, 32) and "notes.txt" in messages
    (tmp_path / "scan" / "notes.txt").unlink()
    (tmp_path / "scan" / "069.xml").write_text("<LidcReadMessage/>")  # LIDC-IDRI's annotations beside the slices
    (tmp_path / "scan" / "mr.dcm").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_dicom_series(tmp_path / "scan").shape == (8, 24, 32)
    only_mr = tmp_path / "mr"
    only_mr.mkdir()
    shutil.copy(get_testdata_file("MR_small.dcm"), only_mr / "mr.dcm")
    with pytest.raises(DicomSeriesError, match="no CT series"):
        read_dicom_series(only_mr)


@pytest.mark.parametrize("keep_bytes", [200, 700, -10], ids=["header-cut", "mid-header", "pixels-cut"])
def test_a_damaged_slice_is_an_error_naming_its_file(tmp_path, keep_bytes):
    """A slice cut short (still starting with the DICOM preamble) is never dropped in silence: reading the
    series fails and names the file, whatever the cut."""
    write_dicom_series(make_volume(), tmp_path / "scan")
    first = sorted((tmp_path / "scan").iterdir())[0]
    first.write_bytes(first.read_bytes()[:keep_bytes])
    with pytest.raises(DicomSeriesError, match=first.name):
        read_dicom_series(tmp_path / "scan")


def test_colour_slices_are_a_clear_error(tmp_path):
    write_dicom_series(make_volume(shape=(3, 8, 8)), tmp_path / "scan")
    for path in sorted((tmp_path / "scan").iterdir()):
        header = pydicom.dcmread(path)
        header.SamplesPerPixel, header.PhotometricInterpretation, header.PlanarConfiguration = 3, "RGB", 0
        header.BitsAllocated, header.BitsStored, header.HighBit, header.PixelRepresentation = 8, 8, 7, 0
        header.PixelData = np.zeros((8, 8, 3), np.uint8).tobytes()
        header.save_as(path)
    with pytest.raises(DicomSeriesError, match="3 samples per pixel"):
        read_dicom_series(tmp_path / "scan")


def test_several_series_are_listed_then_chosen(tmp_path):
    write_dicom_series(make_volume(seed=0), tmp_path / "both" / "a")
    write_dicom_series(make_volume(seed=1), tmp_path / "both" / "b")
    series = list_dicom_series(tmp_path / "both")
    assert len(series) == 2
    assert all((s.modality, s.n_files, s.description, s.patient_id) == ("CT", 8, "m3d", "P1") for s in series)
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
    pixels[1, :3] = -1990
    dataset.PixelData = pixels.tobytes()
    dataset.add_new(0x00280120, "SS", -2000)  # PixelPaddingValue
    dataset.add_new(0x00280121, "SS", -1990)  # PixelPaddingRangeLimit
    dataset.save_as(path)
    volume = read_dicom_series(tmp_path / "series")
    assert (volume.hu[0, 0, :5] == -1024).all() and (volume.hu[0, 1, :3] == -1024).all()
    np.testing.assert_array_equal(volume.hu[0, 2:], pixels[2:])


def _rewrite(path: Path, **tags) -> None:
    dataset = pydicom.dcmread(path)
    for keyword, value in tags.items():
        setattr(dataset, keyword, value)
    dataset.save_as(path)


def test_unsigned_12_bit_and_fractional_rescale(tmp_path):
    volume = make_volume()
    files = write_dicom_series(volume, tmp_path / "series")
    stored = (volume.hu.astype(np.int32) + 1024).astype(np.uint16) | 0xF000  # garbage in the 4 unused bits
    for index, path in enumerate(files):
        _rewrite(
            path,
            PixelRepresentation=0,
            BitsStored=12,
            HighBit=11,
            RescaleIntercept="-1024",
            PixelData=stored[index].tobytes(),
        )
    np.testing.assert_array_equal(read_dicom_series(tmp_path / "series").hu, volume.hu)
    for index, path in enumerate(files):
        _rewrite(path, RescaleSlope="0.5", RescaleIntercept="-1000.25")
    expected = np.rint((stored & 0x0FFF) * 0.5 - 1000.25)
    np.testing.assert_array_equal(read_dicom_series(tmp_path / "series").hu, expected)
    _rewrite(files[0], RescaleSlope="100")
    with pytest.warns(UserWarning, match="clipped in 1 slice"):
        assert read_dicom_series(tmp_path / "series").hu[0].max() == 32767


def test_files_without_preamble_or_file_meta_are_read(tmp_path):
    volume = make_volume()
    for path in write_dicom_series(volume, tmp_path / "series"):
        dataset = pydicom.dcmread(path)
        dataset.preamble = None
        dataset.file_meta = pydicom.dataset.FileMetaDataset()
        dataset.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)
        assert path.read_bytes()[128:132] != b"DICM"
    assert_same(read_dicom_series(tmp_path / "series"), volume)


def test_gantry_tilt_errors_or_is_unsheared(tmp_path):
    volume = make_volume()
    files = write_dicom_series(volume, tmp_path / "series")
    for index, path in enumerate(files):  # slice k was acquired k rows further along the column direction
        dataset = pydicom.dcmread(path)
        shifted = np.full_like(volume.hu[index], -1024)
        shifted[: volume.shape[1] - index] = volume.hu[index, index:]
        dataset.PixelData = shifted.tobytes()
        dataset.ImagePositionPatient = [float(v) for v in volume.voxel_to_world((index, index, 0))]
        dataset.save_as(path)
    with pytest.raises(DicomSeriesError, match="gantry tilt.*on_uneven='resample'"):
        read_dicom_series(tmp_path / "series")
    with pytest.warns(UserWarning, match="tilt"):
        untilted = read_dicom_series(tmp_path / "series", on_uneven="resample")
    np.testing.assert_allclose(untilted.origin_mm, volume.origin_mm, atol=1e-4)
    np.testing.assert_allclose(untilted.spacing_mm, volume.spacing_mm, atol=1e-5)
    for index in range(volume.shape[0]):
        np.testing.assert_array_equal(untilted.hu[index, index:], volume.hu[index, index:])
        assert (untilted.hu[index, :index] == -1024).all()


def test_multi_frame_object_that_is_not_enhanced_ct_is_refused(tmp_path):
    """Enhanced CT objects are read (tests/test_dicom_enhanced.py); frames of a CT Image have no geometry."""
    files = write_dicom_series(make_volume(), tmp_path / "series")
    for path in files[1:]:
        path.unlink()
    _rewrite(files[0], NumberOfFrames=2)
    with pytest.raises(DicomSeriesError, match="0000.dcm is a multi-frame CT Image Storage, not an Enhanced CT image"):
        read_dicom_series(tmp_path / "series")


@pytest.mark.parametrize("make", ["missing", "file", "empty"])
def test_bad_folders(tmp_path, make):
    target = tmp_path / "x"
    if make == "file":
        target.write_text("hello")
    elif make == "empty":
        target.mkdir()
    with pytest.raises(DicomSeriesError):
        read_dicom_series(target)


def test_bad_arguments(tmp_path):
    with pytest.raises(DicomSeriesError, match="on_uneven"):
        read_dicom_series(tmp_path, on_uneven="ignore")
    with pytest.raises(DicomSeriesError, match="filename_pattern"):
        write_dicom_series(make_volume(), tmp_path / "series", filename_pattern="same.dcm")
    assert not (tmp_path / "series").exists()
