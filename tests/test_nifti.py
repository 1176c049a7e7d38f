import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from m3d.data.ct import AXIAL_DIRECTION, CTVolume
from m3d.data.nifti import read_nifti, write_mask_nifti, write_nifti


def make_volume(direction=AXIAL_DIRECTION) -> CTVolume:
    hu = np.random.default_rng(0).integers(-1024, 2000, (5, 12, 16)).astype(np.int16)
    return CTVolume(hu, (2.0, 0.75, 0.5), (-60.0, -45.5, 110.0), direction)


def oblique() -> np.ndarray:
    a = np.deg2rad(25)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ AXIAL_DIRECTION


DESCENDING_LEFT_HANDED = AXIAL_DIRECTION * [-1, 1, 1]  # slices towards the feet, usual rows and columns


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize(
    "direction", [AXIAL_DIRECTION, oblique(), DESCENDING_LEFT_HANDED], ids=["axial", "oblique", "left-handed"]
)
def test_round_trip(tmp_path, suffix, direction):
    volume = make_volume(direction)
    path = write_nifti(volume, tmp_path / f"scan{suffix}")
    read = read_nifti(path)
    np.testing.assert_array_equal(read.hu, volume.hu)
    np.testing.assert_allclose(read.spacing_mm, volume.spacing_mm, atol=1e-6)
    np.testing.assert_allclose(read.origin_mm, volume.origin_mm, atol=1e-4)
    np.testing.assert_allclose(read.direction, volume.direction, atol=1e-6)


def test_affine_is_ras_of_the_same_voxel(tmp_path):
    volume = make_volume(oblique())
    image = nib.load(write_nifti(volume, tmp_path / "scan.nii.gz"))
    z, y, x = 3, 7, 11
    ras = image.affine @ [x, y, z, 1]
    lps = volume.voxel_to_world((z, y, x))
    np.testing.assert_allclose(ras[:3], [-lps[0], -lps[1], lps[2]], atol=1e-4)
    assert image.get_data_dtype() == np.int16 and image.dataobj[x, y, z] == volume.hu[z, y, x]
    assert int(image.header["sform_code"]) == 1 and int(image.header["qform_code"]) == 1


def test_any_axis_order_is_read_from_the_affine(tmp_path):
    data = np.random.default_rng(1).integers(-1000, 1000, (6, 7, 8)).astype(np.int16)
    # i runs inferior (z down), j runs left-right reversed, k runs anterior: a sagittal-like storage order
    affine = np.array([[0.0, -0.8, 0.0, 40.0], [0.0, 0.0, 1.5, -20.0], [-2.5, 0.0, 0.0, 70.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "sagittal.nii.gz")
    volume = read_nifti(tmp_path / "sagittal.nii.gz")
    assert volume.shape == (8, 7, 6)
    np.testing.assert_allclose(volume.spacing_mm, (1.5, 0.8, 2.5))
    for i, j, k in [(0, 0, 0), (5, 6, 7), (2, 3, 4)]:
        ras = affine @ [i, j, k, 1]
        np.testing.assert_allclose(volume.voxel_to_world((k, j, i)), [-ras[0], -ras[1], ras[2]], atol=1e-5)
        assert volume.hu[k, j, i] == data[i, j, k]


def test_out_of_range_values_are_clipped_with_a_warning(tmp_path):
    data = np.full((4, 4, 4), 40000, np.int32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "big.nii")
    with pytest.warns(UserWarning, match="clipped"):
        assert read_nifti(tmp_path / "big.nii").hu.max() == 32767


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_truncated_file_is_a_clear_error(tmp_path, suffix):
    write_nifti(make_volume(), tmp_path / f"scan{suffix}")
    data = (tmp_path / f"scan{suffix}").read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ValueError, match=f"cut{suffix}.*(truncated|not a readable)"):
        read_nifti(tmp_path / f"cut{suffix}")


def test_colour_voxels_are_a_clear_error(tmp_path):
    rgb = np.zeros((4, 4, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), tmp_path / "rgb.nii")
    with pytest.raises(ValueError, match=r"colour \(R, G, B\) voxels"):
        read_nifti(tmp_path / "rgb.nii")


def test_nonfinite_voxels_are_refused_unless_filled(tmp_path):
    data = np.full((4, 5, 6), -700.0, np.float32)
    data[1, 2, 3], data[0, 0, 0] = np.nan, np.inf
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "holes.nii")
    with pytest.raises(ValueError, match="2 NaN or infinite voxels"):
        read_nifti(tmp_path / "holes.nii")
    filled = read_nifti(tmp_path / "holes.nii", fill_nonfinite_hu=-1024)
    assert filled.hu[3, 2, 1] == -1024 and filled.hu[0, 0, 0] == -1024 and (filled.hu == -700).sum() == data.size - 2


@pytest.mark.parametrize("direction", [oblique(), DESCENDING_LEFT_HANDED], ids=["oblique", "left-handed"])
def test_simpleitk_sees_the_same_lps_geometry(tmp_path, direction):
    volume = make_volume(direction)
    image = sitk.ReadImage(str(write_nifti(volume, tmp_path / "scan.nii.gz")))
    np.testing.assert_allclose(image.GetOrigin(), volume.origin_mm, atol=1e-4)
    np.testing.assert_allclose(image.GetSpacing(), volume.spacing_mm[::-1], atol=1e-6)
    np.testing.assert_allclose(np.array(image.GetDirection()).reshape(3, 3), volume.direction[:, ::-1], atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), volume.hu)


def test_scaled_nifti_is_converted_to_hu(tmp_path):
    volume = make_volume()
    data = (volume.hu.transpose(2, 1, 0).astype(np.int32) + 1024).astype(np.uint16)
    image = nib.Nifti1Image(data, np.diag([-0.5, -0.75, 2.0, 1.0]))
    image.header.set_slope_inter(1.0, -1024.0)
    nib.save(image, tmp_path / "scaled.nii")
    np.testing.assert_array_equal(read_nifti(tmp_path / "scaled.nii").hu, volume.hu)


def test_mask_is_written_on_the_reference_grid(tmp_path):
    volume = make_volume()
    mask = volume.hu > 500
    image = nib.load(write_mask_nifti(mask, volume, tmp_path / "mask.nii.gz"))
    assert image.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(image.dataobj).transpose(2, 1, 0).astype(bool), mask)
    with pytest.raises(ValueError, match="shape"):
        write_mask_nifti(mask[:2], volume, tmp_path / "bad.nii.gz")


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match=".nii"):
        write_nifti(make_volume(), tmp_path / "scan.img")
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(ValueError, match="not a readable NIfTI"):
        read_nifti(tmp_path / "broken.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.int16), np.eye(4)), tmp_path / "4d.nii")
    with pytest.raises(ValueError, match="3-D"):
        read_nifti(tmp_path / "4d.nii")
