import re

import numpy as np
import pytest
import torch
from scipy import ndimage

from m3d.data.ct import CTVolume
from m3d.data.lungs import segment_lungs
from m3d.tamper.cube import (
    CUBE_SIZE,
    HOLE_SIZE,
    IN_PLANE,
    THROUGH_PLANE,
    TamperLocationError,
    extract_cube,
    finest_grain,
    hole_mask,
    hu_to_unit,
    neighbour_correlation,
    paste_cube,
    unit_to_hu,
)


def chest_box(seed: int = 0) -> CTVolume:
    """Body (+40 HU) in air, with two noisy lungs (-850 HU); 60 x 96 x 96 at 1.25 x 0.8 x 0.8 mm."""
    rng = np.random.default_rng(seed)
    hu = np.full((60, 96, 96), -1000.0)
    hu[:, 8:88, 4:92] = 40
    hu[2:58, 14:82, 8:46] = -850
    hu[2:58, 14:82, 50:88] = -850
    hu += rng.normal(0, 15, hu.shape)
    return CTVolume(hu, (1.25, 0.8, 0.8), (-38.0, -38.0, -100.0))


def lung_center(volume: CTVolume) -> np.ndarray:
    return volume.voxel_to_world((30, 48, 27))


def test_unit_scaling_inverts_inside_window():
    hu = np.array([-1000.0, -500.0, 0.0, 600.0])
    np.testing.assert_allclose(unit_to_hu(hu_to_unit(hu)), hu)
    assert hu_to_unit(np.array([-3000.0, 3000.0])).tolist() == [-1.0, 1.0]
    assert torch.allclose(hu_to_unit(torch.tensor([600.0])), torch.tensor([1.0]))


def test_hole_is_centred():
    mask = hole_mask()
    assert mask.sum() == HOLE_SIZE**3
    start = (CUBE_SIZE - HOLE_SIZE) // 2
    assert mask[start, start, start] and not mask[start - 1, start, start]


def test_lung_segmentation_finds_both_lungs():
    volume = chest_box()
    lungs = segment_lungs(volume)
    assert lungs[30, 48, 27] and lungs[30, 48, 70]
    assert not lungs[30, 2, 2] and not lungs[30, 48, 48]


def test_extract_samples_the_scan_at_1mm():
    volume = chest_box()
    cube = extract_cube(volume, lung_center(volume))
    assert cube.hu.shape == (CUBE_SIZE,) * 3 and cube.hu.dtype == np.float32
    assert abs(np.median(cube.hu[hole_mask()]) + 850) < 10
    centre_world = cube.affine[:3, :3] @ np.full(3, (CUBE_SIZE - 1) / 2) + cube.affine[:3, 3]
    np.testing.assert_allclose(centre_world, lung_center(volume))


def test_paste_changes_only_the_cube_and_leaves_no_seam():
    volume = chest_box()
    center = lung_center(volume)
    cube = extract_cube(volume, center)
    generated = cube.hu.copy()
    z, y, x = np.indices(generated.shape) - (CUBE_SIZE - 1) / 2
    generated[z**2 + y**2 + x**2 < 36] = 30  # a 12 mm solid nodule
    tampered, changed = paste_cube(volume, cube, generated, replaced=hole_mask().astype(np.float32), grain_rng=None)
    assert tampered.hu.dtype == np.int16 and tampered.shape == volume.shape
    assert tampered.hu[30, 48, 27] > -100  # the nodule is there
    footprint_vox = np.ceil(CUBE_SIZE / 2 / np.asarray(volume.spacing_mm)).astype(int) + 1
    centre_vox = np.array([30, 48, 27])
    outside = np.ones(volume.shape, bool)
    outside[tuple(slice(c - f, c + f + 1) for c, f in zip(centre_vox, footprint_vox))] = False
    np.testing.assert_array_equal(tampered.hu[outside], volume.hu[outside])
    assert changed.any() and not changed[outside].any()
    difference = np.abs(tampered.hu.astype(int) - volume.hu)
    # Near the cube's faces the blend weight is ~0: changes there stay within the noise level.
    face = centre_vox[2] + int(13 / volume.spacing_mm[2])
    assert difference[:, :, face].max() < 60
    assert difference[changed].max() > 500


def test_identity_paste_changes_nothing():
    volume = chest_box()
    cube = extract_cube(volume, lung_center(volume))
    tampered, changed = paste_cube(volume, cube, cube.hu, replaced=np.zeros_like(cube.hu), grain_rng=None)
    np.testing.assert_array_equal(tampered.hu, volume.hu)
    assert not changed.any()


def test_what_is_not_replaced_keeps_the_scans_noise():
    volume = chest_box()
    cube = extract_cube(volume, lung_center(volume))
    smooth_fill = np.full_like(cube.hu, -850.0)  # a generator output without any noise, added as a change only
    tampered, _ = paste_cube(volume, cube, smooth_fill, replaced=np.zeros_like(cube.hu), grain_rng=None)
    region = (slice(27, 33), slice(42, 54), slice(22, 32))
    assert np.std(tampered.hu[region]) > 0.5 * np.std(volume.hu[region])


def test_a_replaced_nodule_leaves_no_outline_in_the_scan():
    """A fill that replaces a dense nodule takes its place whole, though the scan's 0.8 mm pixels and 1.25 mm slices
    hold the nodule's edge finer than the 1 mm cube does; adding only the change leaves that edge behind."""
    volume = chest_box()
    centre = np.array([30, 48, 27])
    distance_mm = np.linalg.norm(
        (np.indices(volume.shape).T - centre).T * np.reshape(volume.spacing_mm, (3, 1, 1, 1)), axis=0
    )
    volume = volume.with_hu(np.where(distance_mm < 5.0, 40, volume.hu).astype(np.int16))  # a 10 mm solid nodule
    cube = extract_cube(volume, lung_center(volume))
    lung_fill = np.where(hole_mask(), -850.0, cube.hu).astype(np.float32)
    replaced, _ = paste_cube(volume, cube, lung_fill, replaced=hole_mask().astype(np.float32), grain_rng=None)
    added, _ = paste_cube(volume, cube, lung_fill, replaced=np.zeros_like(cube.hu), grain_rng=None)
    near_centre = distance_mm < 6.0  # the nodule and its edge, well inside the 20 mm hole
    assert (replaced.hu[near_centre] == -850).all()
    assert np.abs(added.hu[near_centre] + 850).max() > 200


def test_a_replaced_region_gets_the_scans_finest_grain_back():
    """Replaced voxels hold the 1 mm cube resampled; with a ``grain_rng`` the paste draws the grain finer than the
    cube anew at the scan's own level (same seed, same grain), where without one they are as smooth as the fill."""
    volume = chest_box()
    cube = extract_cube(volume, lung_center(volume))
    smooth_fill = np.where(hole_mask(), -850.0, cube.hu).astype(np.float32)

    core = (slice(27, 34), slice(42, 55), slice(21, 34))  # within 5 mm of the hole's centre (30, 48, 27)
    other_lung = (slice(27, 34), slice(42, 55), slice(62, 75))
    scan_grain = finest_grain(volume.hu.astype(np.float32))[other_lung].std()

    def pasted(seed: int | None) -> np.ndarray:
        rng = None if seed is None else np.random.default_rng(seed)
        return paste_cube(volume, cube, smooth_fill, replaced=hole_mask().astype(np.float32), grain_rng=rng)[0].hu

    assert finest_grain(pasted(None).astype(np.float32))[core].std() < 0.05 * scan_grain
    grains = [finest_grain(pasted(seed).astype(np.float32))[core].std() / scan_grain for seed in (0, 1)]
    assert all(0.7 < ratio < 1.3 for ratio in grains), grains
    assert abs(pasted(0)[core].mean() + 850) < 2
    np.testing.assert_array_equal(pasted(0), pasted(0))
    assert not np.array_equal(pasted(0), pasted(1))


def test_the_drawn_grain_has_the_scans_texture():
    """On a scan whose noise is correlated in-plane and across slices (a reconstruction kernel, overlapping
    slices), the grain drawn into a replaced region has the scan's neighbour correlations, not white noise's."""
    volume = chest_box()
    rng = np.random.default_rng(3)
    textured_noise = ndimage.gaussian_filter(rng.standard_normal(volume.shape), (0.9, 1.0, 1.0))
    volume = volume.with_hu(np.where(volume.hu < -500, -850 + 40 * textured_noise / textured_noise.std(), volume.hu))
    cube = extract_cube(volume, lung_center(volume))
    smooth_fill = np.where(hole_mask(), -850.0, cube.hu).astype(np.float32)
    tampered = paste_cube(
        volume, cube, smooth_fill, replaced=hole_mask().astype(np.float32), grain_rng=np.random.default_rng(0)
    )[0]

    core = np.zeros(volume.shape, bool)
    core[27:34, 42:55, 21:34] = True  # within 5 mm of the hole's centre (30, 48, 27)
    other_lung = np.zeros(volume.shape, bool)
    other_lung[27:34, 42:55, 62:75] = True
    scan_grain = finest_grain(volume.hu.astype(np.float32))
    pasted_grain = finest_grain(tampered.hu.astype(np.float32))
    for axes in (IN_PLANE, THROUGH_PLANE):
        scan_texture = neighbour_correlation(scan_grain, other_lung, axes)
        assert scan_texture > 0.3, scan_texture
        assert abs(neighbour_correlation(pasted_grain, core, axes) - scan_texture) < 0.1, axes
    assert 0.7 < pasted_grain[core].std() / scan_grain[other_lung].std() < 1.3


def test_the_drawn_grain_is_the_scans_noise_not_its_fine_structure():
    """Bright single voxels in the lung (structure finer than the 1 mm cube, as vessel edges) fill the variance of the
    scan's finest grain; the paste draws the noise's level beneath them, not theirs."""
    quiet = chest_box()
    rng = np.random.default_rng(5)
    specks = (quiet.hu < -500) & (rng.random(quiet.shape) < 0.03)
    volume = quiet.with_hu(np.where(specks, quiet.hu + 400, quiet.hu))
    cube = extract_cube(volume, lung_center(volume))
    smooth_fill = np.where(hole_mask(), -850.0, cube.hu).astype(np.float32)
    tampered = paste_cube(
        volume, cube, smooth_fill, replaced=hole_mask().astype(np.float32), grain_rng=np.random.default_rng(0)
    )[0]
    core = (slice(27, 34), slice(42, 55), slice(21, 34))  # within 5 mm of the hole's centre (30, 48, 27)
    other_lung = (slice(27, 34), slice(42, 55), slice(62, 75))
    noise_level = finest_grain(quiet.hu.astype(np.float32))[other_lung].std()
    assert finest_grain(volume.hu.astype(np.float32))[other_lung].std() > 3 * noise_level
    assert 0.7 < finest_grain(tampered.hu.astype(np.float32))[core].std() / noise_level < 1.3


@pytest.mark.parametrize(
    "replaced, message",
    [(np.zeros((20, 20, 20)), r"replaced must have shape \(32, 32, 32\)"), (np.full((32,) * 3, 2.0), "must lie in")],
)
def test_paste_refuses_replaced_weights_of_another_shape_or_range(replaced, message):
    volume = chest_box()
    cube = extract_cube(volume, lung_center(volume))
    with pytest.raises(ValueError, match=message):
        paste_cube(volume, cube, cube.hu, replaced=replaced, grain_rng=None)


@pytest.mark.parametrize(
    "voxel, kwargs, message",
    [
        ((30, 48, 200), {}, "outside the scan"),
        ((3, 48, 27), {}, "beyond the scan along z"),
        ((30, 48, 48), {}, "not inside the lungs"),
        ((30, 48, 27), {"avoid": "near"}, "overlaps another nodule"),
    ],
)
def test_bad_locations_are_refused(voxel, kwargs, message):
    volume = chest_box()
    center = volume.voxel_to_world(voxel)
    if kwargs.get("avoid") == "near":
        kwargs = {"avoid": [(center + np.array([8.0, 0, 0]), 4.0)]}
    with pytest.raises(TamperLocationError, match=message) as error:
        extract_cube(volume, center, **kwargs)
    assert "np." not in str(error.value) and re.search(
        r"location \(-?\d+\.\d, -?\d+\.\d, -?\d+\.\d\) mm", str(error.value)
    )
    if "lungs" in message:
        assert "--allow-outside-lung" in str(error.value)  # the flag as the command line spells it


def test_outside_lung_can_be_forced():
    volume = chest_box()
    extract_cube(volume, volume.voxel_to_world((30, 48, 48)), allow_outside_lung=True)
