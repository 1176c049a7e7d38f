import numpy as np
import pytest

from m3d.data.ct import AXIAL_DIRECTION, CTVolume
from m3d.data.resample import resample_to_reference, resample_to_spacing


def oblique_direction() -> np.ndarray:
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    return rotation @ AXIAL_DIRECTION


def test_voxel_world_round_trip_oblique():
    volume = CTVolume(np.zeros((5, 6, 7), np.int16), (2.5, 0.7, 0.7), (-100.0, -120.0, 30.0), oblique_direction())
    index = np.array([[0, 0, 0], [4, 5, 6], [1.5, 2.25, 3.0]])
    world = volume.voxel_to_world(index)
    np.testing.assert_allclose(world[0], volume.origin_mm)
    np.testing.assert_allclose(volume.world_to_voxel(world), index, atol=1e-9)


def test_axial_geometry_moves_along_expected_axes():
    volume = CTVolume(np.zeros((4, 4, 4), np.int16), (2.0, 0.5, 0.75), (10.0, 20.0, 30.0))
    np.testing.assert_allclose(volume.voxel_to_world((1, 0, 0)), (10.0, 20.0, 32.0))  # slice -> +z
    np.testing.assert_allclose(volume.voxel_to_world((0, 1, 0)), (10.0, 20.5, 30.0))  # row -> +y
    np.testing.assert_allclose(volume.voxel_to_world((0, 0, 1)), (10.75, 20.0, 30.0))  # column -> +x


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(hu=np.zeros((4, 4)), spacing_mm=(1, 1, 1)), "3-D"),
        (dict(hu=np.zeros((2, 2, 2)), spacing_mm=(1, 0, 1)), "positive"),
        (dict(hu=np.zeros((2, 2, 2)), spacing_mm=(1, 1, 1), direction=np.ones((3, 3))), "orthonormal"),
        (dict(hu=np.full((2, 2, 2), 1e6), spacing_mm=(1, 1, 1)), "int16"),
    ],
)
def test_invalid_volumes_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CTVolume(**kwargs)


def test_float_hu_is_rounded_to_int16():
    volume = CTVolume(np.full((2, 2, 2), -999.6), (1, 1, 1))
    assert volume.hu.dtype == np.int16 and volume.hu[0, 0, 0] == -1000


def test_resample_to_1mm_keeps_physical_positions():
    z, y, x = np.meshgrid(np.arange(10), np.arange(20), np.arange(20), indexing="ij")
    spacing = (2.5, 0.5, 0.8)
    # A linear HU ramp in world x is reproduced exactly by linear interpolation.
    volume = CTVolume((x * spacing[2] * 10).astype(np.int16), spacing, (5.0, -3.0, 100.0))
    iso = resample_to_spacing(volume)
    assert iso.spacing_mm == (1.0, 1.0, 1.0)
    assert iso.shape == (23, 10, 16)
    np.testing.assert_allclose(iso.voxel_to_world((0, 0, 0)), volume.origin_mm)
    world_x = iso.voxel_to_world(np.stack(np.indices(iso.shape), -1))[..., 0]
    np.testing.assert_allclose(iso.hu, np.rint((world_x - 5.0) * 10), atol=1)


def test_resample_back_to_reference_recovers_smooth_volume():
    z, y, x = np.indices((12, 24, 24))
    hu = (200 * np.sin(x / 6.0) + 150 * np.cos(y / 5.0) + 10 * z).astype(np.int16)
    volume = CTVolume(hu, (2.0, 0.7, 0.7), (0.0, 0.0, 0.0))
    back = resample_to_reference(resample_to_spacing(volume, (0.5, 0.35, 0.35)), volume)
    assert back.shape == volume.shape and back.spacing_mm == volume.spacing_mm
    interior = (slice(0, 11), slice(0, 23), slice(0, 23))
    assert np.abs(back.hu[interior].astype(int) - hu[interior]).max() <= 3
