"""Enhanced CT (multi-frame) DICOM: read as the single-frame series it stands for, refused where it cannot be,
and written as an option of `write_dicom_series` / `m3d convert --enhanced`."""

import copy
import random
import re
import shutil

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    LegacyConvertedEnhancedCTImageStorage,
    RLELossless,
    generate_uid,
)
from test_dicom import DESCENDING, assert_same, make_volume, oblique

from m3d.cli import main
from m3d.data.ct import AXIAL_DIRECTION, CTVolume
from m3d.data.dicom import DicomSeriesError, read_dicom_series, write_dicom_series

SERIES_UID = "1.2.826.0.1.3680043.8.498.1"


def item(**values) -> Dataset:
    dataset = Dataset()
    for keyword, value in values.items():
        setattr(dataset, keyword, value)
    return dataset


def rescale(index: int) -> tuple[float, float]:
    """A (slope, intercept) of its own for each slice: unsigned stored values that give the HU exactly."""
    return (0.5 if index % 2 else 1.0), -1024.0 - 7 * index


def enhanced_dataset(volume: CTVolume, order: list[int], sop_class=EnhancedCTImageStorage) -> Dataset:
    """``volume`` as an Enhanced CT object built with pydicom alone (not m3d's writer): frame k holds slice
    ``order[k]``, with that slice's position and rescale in its per-frame functional groups."""
    dataset = item(
        SOPClassUID=sop_class,
        SOPInstanceUID=generate_uid(),
        SeriesInstanceUID=SERIES_UID,
        StudyInstanceUID=SERIES_UID + ".1",
        FrameOfReferenceUID=SERIES_UID + ".2",
        Modality="CT",
        PatientID="P1",
        Rows=volume.shape[1],
        Columns=volume.shape[2],
        NumberOfFrames=len(order),
        SamplesPerPixel=1,
        PhotometricInterpretation="MONOCHROME2",
        BitsAllocated=16,
        BitsStored=16,
        HighBit=15,
        PixelRepresentation=0,
    )
    dataset.SharedFunctionalGroupsSequence = [
        item(
            PlaneOrientationSequence=[
                item(ImageOrientationPatient=[*volume.direction[:, 2], *volume.direction[:, 1]])
            ],
            PixelMeasuresSequence=[
                item(PixelSpacing=list(volume.spacing_mm[1:]), SliceThickness=volume.spacing_mm[0])
            ],
        )
    ]
    dataset.PerFrameFunctionalGroupsSequence = [
        item(
            PlanePositionSequence=[item(ImagePositionPatient=list(volume.voxel_to_world((index, 0, 0))))],
            PixelValueTransformationSequence=[
                item(RescaleSlope=rescale(index)[0], RescaleIntercept=rescale(index)[1], RescaleType="HU")
            ],
        )
        for index in order
    ]
    stored = [(volume.hu[index] - rescale(index)[1]) / rescale(index)[0] for index in order]
    dataset.PixelData = np.array(stored).astype("<u2").tobytes()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return dataset


def shuffled(n: int) -> list[int]:
    order = list(range(n))
    random.Random(n).shuffle(order)
    return order


def save(dataset: Dataset, path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)


# -- (a) a real object ----------------------------------------------------------------------------------
@pytest.fixture
def ect_folder(tmp_path):
    """A folder holding a copy of eCT_Supplemental.dcm."""
    pytest.importorskip("data_store", reason="eCT_Supplemental.dcm comes with pydicom-data (the `test` extra)")
    (tmp_path / "ect").mkdir()
    shutil.copy(pydicom.data.get_testdata_file("eCT_Supplemental.dcm"), tmp_path / "ect")
    return tmp_path / "ect"


def test_real_enhanced_ct_agrees_with_simpleitk(ect_folder):
    """eCT_Supplemental.dcm (pydicom-data): a real Enhanced CT Image Storage object, a derived CT perfusion map
    (ImageType DERIVED\\PRIMARY\\PERFUSION\\RCBF, brain) of 2 frames of 512 x 512: uint16 stored values with a
    shared intercept of -1024 (HU -1024..172), 0.388672 mm pixels, rows running to patient right, frames 10 mm
    apart and stored against the slice normal, and a supplemental palette (PixelPresentation COLOR, a colour LUT
    for display) that leaves the grey values as they are. m3d and SimpleITK (GDCM) must put the same HU at
    every voxel centre; they stack the two frames in opposite orders, so voxels are matched by position."""
    path = ect_folder / "eCT_Supplemental.dcm"
    dataset = pydicom.dcmread(path, stop_before_pixels=True)
    assert (dataset.SOPClassUID, dataset.Modality, dataset.NumberOfFrames, dataset.Rows, dataset.Columns) == (
        EnhancedCTImageStorage,
        "CT",
        2,
        512,
        512,
    )
    assert dataset.PixelPresentation == "COLOR" and "RedPaletteColorLookupTableDescriptor" in dataset
    volume = read_dicom_series(ect_folder)
    assert volume.metadata.series_instance_uid == dataset.SeriesInstanceUID
    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image)  # (z, y, x)

    itk_affine = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())  # columns: index x, y, z
    to_itk = np.linalg.inv(itk_affine) @ volume.affine[:3, :3]  # m3d index (z, y, x) -> SimpleITK index (x, y, z)
    shift = np.linalg.inv(itk_affine) @ (np.array(volume.origin_mm) - np.array(image.GetOrigin()))
    np.testing.assert_allclose(to_itk, np.rint(to_itk), atol=1e-6)  # the same voxel centres, in some axis order
    np.testing.assert_allclose(shift, np.rint(shift), atol=1e-6)
    itk_index = np.rint(to_itk @ np.indices(volume.shape).reshape(3, -1) + shift[:, None]).astype(int)
    np.testing.assert_array_equal(volume.hu, array[itk_index[2], itk_index[1], itk_index[0]].reshape(volume.shape))
    assert sorted(volume.spacing_mm) == pytest.approx(sorted(image.GetSpacing()), abs=1e-6)
    assert (volume.hu.min(), volume.hu.max()) == (-1024, 172)


@pytest.mark.parametrize("enhanced", [True, False], ids=["enhanced", "slices"])
def test_real_object_is_written_back_without_its_palette(tmp_path, ect_folder, enhanced):
    """The palette maps the source's stored values (HU + 1024), not the written ones (HU)."""
    volume = read_dicom_series(ect_folder)
    files = write_dicom_series(volume, tmp_path / "out", enhanced=enhanced)
    assert_same(read_dicom_series(tmp_path / "out"), volume)
    written = pydicom.dcmread(files[0])
    assert written.PatientID == "0010" and "RedPaletteColorLookupTableData" not in written
    assert written.get("PixelPresentation", "MONOCHROME") == "MONOCHROME"


# -- (b) a synthetic object reads as its single-frame series ------------------------------------------
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless], ids=["native", "rle"])
@pytest.mark.parametrize("direction", [AXIAL_DIRECTION, oblique()], ids=["axial", "oblique"])
def test_enhanced_object_reads_as_its_single_frame_series(tmp_path, direction, syntax):
    volume = make_volume(direction=direction)
    write_dicom_series(volume, tmp_path / "slices")
    order = shuffled(volume.shape[0])
    dataset = enhanced_dataset(volume, order)
    if syntax != ExplicitVRLittleEndian:
        dataset.compress(syntax)
    save(dataset, tmp_path / "enhanced" / "ct.dcm")
    enhanced = read_dicom_series(tmp_path / "enhanced")
    assert_same(enhanced, read_dicom_series(tmp_path / "slices"))
    assert_same(enhanced, volume)
    headers = enhanced.metadata.source_headers
    assert [header.frame_number for header in headers] == [order.index(index) + 1 for index in range(len(order))]
    assert [header.RescaleIntercept for header in headers] == [rescale(index)[1] for index in range(len(order))]
    assert all("PixelData" not in header and "NumberOfFrames" not in header for header in headers)


def test_legacy_converted_enhanced_ct_is_read_too(tmp_path):
    volume = make_volume()
    save(
        enhanced_dataset(volume, shuffled(volume.shape[0]), LegacyConvertedEnhancedCTImageStorage),
        tmp_path / "legacy" / "ct.dcm",
    )
    assert_same(read_dicom_series(tmp_path / "legacy"), volume)


# -- (c) refusals -------------------------------------------------------------------------------------
def _per_frame(dataset: Dataset, group: str) -> list[Dataset]:
    """Move a shared functional group into every frame's groups; its items, frame by frame."""
    shared = dataset.SharedFunctionalGroupsSequence[0]
    for frame in dataset.PerFrameFunctionalGroupsSequence:
        setattr(frame, group, copy.deepcopy(shared[group].value))
    delattr(shared, group)
    return [frame[group][0] for frame in dataset.PerFrameFunctionalGroupsSequence]


def _orientation(dataset: Dataset) -> None:
    _per_frame(dataset, "PlaneOrientationSequence")[3].ImageOrientationPatient = [1, 0, 0, 0, 0.9, -0.43589]


def _pixel_spacing(dataset: Dataset) -> None:
    _per_frame(dataset, "PixelMeasuresSequence")[3].PixelSpacing = [0.7, 0.9]


def _position(dataset: Dataset) -> None:
    del dataset.PerFrameFunctionalGroupsSequence[3].PlanePositionSequence


def _truncated(dataset: Dataset) -> None:
    dataset.PixelData = dataset.PixelData[: -24 * 32 * 2]


def _frame_count(dataset: Dataset) -> None:
    dataset.NumberOfFrames = 9


@pytest.mark.parametrize(
    "damage, message",
    [
        (_orientation, "ct.dcm frame 4: ImageOrientationPatient differs from the rest of the series"),
        (_pixel_spacing, "ct.dcm frame 4: PixelSpacing differs from the rest of the series"),
        (_position, "ct.dcm frame 4 has no ImagePositionPatient: the series geometry is unknown"),
        (_truncated, "ct.dcm: pixel data is truncated (10752 of 12288 bytes)"),
        (_frame_count, "ct.dcm has 8 per-frame functional groups for its 9 frames"),
    ],
    ids=["orientation", "pixel-spacing", "position", "truncated", "frame-count"],
)
def test_inconsistent_frames_are_refused(tmp_path, damage, message):
    volume = make_volume()
    dataset = enhanced_dataset(volume, list(range(volume.shape[0])))
    damage(dataset)
    save(dataset, tmp_path / "series" / "ct.dcm")
    with pytest.raises(DicomSeriesError, match=re.escape(message)):
        read_dicom_series(tmp_path / "series")


def test_an_object_beside_other_files_of_its_series_is_refused(tmp_path):
    volume = make_volume()
    save(enhanced_dataset(volume, list(range(volume.shape[0]))), tmp_path / "series" / "a.dcm")
    save(enhanced_dataset(volume, list(range(volume.shape[0]))), tmp_path / "series" / "b.dcm")
    with pytest.raises(DicomSeriesError, match="a.dcm and b.dcm are both multi-frame objects of series "):
        read_dicom_series(tmp_path / "series")
    (tmp_path / "series" / "b.dcm").unlink()
    write_dicom_series(volume, tmp_path / "series" / "slices", series_instance_uid=SERIES_UID)
    with pytest.raises(DicomSeriesError, match=r"a.dcm is a multi-frame object of series .* also has 8 single-frame"):
        read_dicom_series(tmp_path / "series")


# -- (d) writing --------------------------------------------------------------------------------------
@pytest.mark.parametrize("direction", [AXIAL_DIRECTION, oblique(), DESCENDING], ids=["axial", "oblique", "descending"])
def test_enhanced_write_round_trip_and_standard_reader(tmp_path, direction):
    volume = make_volume(direction=direction)
    files = write_dicom_series(volume, tmp_path / "series", enhanced=True, uid_seed="t")
    assert [path.name for path in files] == ["0000.dcm"]
    dataset = pydicom.dcmread(files[0])
    assert dataset.SOPClassUID == EnhancedCTImageStorage and dataset.NumberOfFrames == volume.shape[0]
    assert "ImagePositionPatient" not in dataset and "RescaleIntercept" not in dataset
    assert_same(read_dicom_series(tmp_path / "series"), volume)
    image = sitk.ReadImage(str(files[0]))  # GDCM's reading of the same object
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), volume.hu)
    np.testing.assert_allclose(image.GetSpacing(), volume.spacing_mm[::-1], atol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), volume.origin_mm, atol=1e-4)
    np.testing.assert_allclose(np.array(image.GetDirection()).reshape(3, 3), volume.direction[:, ::-1], atol=1e-5)


def test_a_volume_read_from_an_enhanced_object_is_written_either_way(tmp_path):
    volume = make_volume()
    write_dicom_series(volume, tmp_path / "source", enhanced=True)
    source = read_dicom_series(tmp_path / "source")
    for enhanced in (True, False):
        files = write_dicom_series(
            source, tmp_path / f"derived-{enhanced}", series_description="tampered", enhanced=enhanced
        )
        assert len(files) == (1 if enhanced else volume.shape[0])
        derived = read_dicom_series(tmp_path / f"derived-{enhanced}")
        assert_same(derived, volume)
        assert derived.metadata.patient_id == "P1" and derived.metadata.description == "tampered"
        assert derived.metadata.series_instance_uid != source.metadata.series_instance_uid


def test_convert_enhanced_option(tmp_path, capsys):
    volume = make_volume()
    write_dicom_series(volume, tmp_path / "slices")
    assert main(["convert", str(tmp_path / "slices"), str(tmp_path / "enhanced"), "--enhanced"]) == 0
    assert len(list((tmp_path / "enhanced").iterdir())) == 1
    assert_same(read_dicom_series(tmp_path / "enhanced"), volume)
    assert main(["convert", str(tmp_path / "enhanced"), str(tmp_path / "scan.nii.gz"), "--enhanced"]) == 2
    assert "--enhanced applies to a DICOM target folder" in capsys.readouterr().err
