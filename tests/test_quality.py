import numpy as np
import pytest
from scipy import ndimage

from m3d.constants import CUBE_SIZE, HOLE_SIZE
from m3d.tamper.cube import hole_mask
from m3d.tamper.nodule_shape import bank_nodule_mask, fit_mask_in_hole, random_nodule_mask, sample_target_diameter_mm
from m3d.tamper.quality import (
    QualityCriteria,
    check_quality,
    chest_wall,
    distance_from_centre_mm,
    equivalent_diameter_mm,
    measure_nodule,
    nodule_mask,
)


def _cube(radius_mm: float = 0.0, center=(15.5, 15.5, 15.5), background: float = -850.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hu = background + rng.normal(0, 30, (32, 32, 32))
    grid = np.indices((32, 32, 32)).astype(float)
    distance = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, center)))
    hu[distance <= radius_mm] = 40.0
    return hu.astype(np.float32)


@pytest.mark.parametrize("radius", [3.0, 4.5, 6.0, 7.5])
def test_sphere_diameter_is_measured(radius):
    measurement = measure_nodule(_cube(radius))
    assert measurement.diameter_mm == pytest.approx(2 * radius, abs=1.0)
    assert measurement.mean_hu == pytest.approx(40.0, abs=1.0)


def test_empty_cube_has_no_nodule():
    measurement = measure_nodule(_cube(0.0))
    assert measurement.diameter_mm == 0.0 and measurement.volume_mm3 == 0.0 and np.isnan(measurement.mean_hu)


def test_off_centre_nodule_and_tissue_outside_the_hole_are_ignored():
    hu = _cube(0.0)
    grid = np.indices(hu.shape).astype(float)
    hu[np.sqrt(((grid - np.array([15.5, 15.5, 23.0])[:, None, None, None]) ** 2).sum(0)) <= 3] = 40.0  # off centre
    hu[:, :, :5] = 50.0  # chest wall, outside the 20^3 hole
    assert measure_nodule(hu).diameter_mm == 0.0


def test_thin_vessel_touching_the_nodule_is_cut_off():
    hu = _cube(6.0)
    with_vessel = hu.copy()
    with_vessel[15, 15, :] = 30.0  # a 1-voxel vessel across the cube
    assert measure_nodule(with_vessel).diameter_mm == pytest.approx(measure_nodule(hu).diameter_mm, abs=0.1)


def _against_the_wall() -> tuple[np.ndarray, np.ndarray]:
    """A site 7 mm from the chest wall with a 6 mm benign nodule (pristine), and a 13 mm nodule grown there, against
    the wall."""
    z, y, x = np.indices((32, 32, 32)) - 15.5
    pristine = np.full((32, 32, 32), -850.0, np.float32)
    pristine[:, :, :9] = 40.0
    pristine[np.sqrt(z**2 + y**2 + x**2) <= 3.0] = 30.0
    grown = np.where(np.sqrt(z**2 + y**2 + (x + 2.0) ** 2) <= 6.5, -60.0, pristine).astype(np.float32)
    return pristine, grown


def test_the_chest_wall_is_the_thick_tissue_reaching_the_faces():
    pristine, _ = _against_the_wall()
    wall = chest_wall(pristine)
    assert wall[6:26, 6:26, :9].all() and wall[6:26, 6:26, 9].all()  # grown by one voxel (the corners are rounded)
    assert not wall[:, :, 11:].any()  # not the benign nodule inside the hole, nor a vessel
    with_vessel = pristine.copy()
    with_vessel[20, 20, 9:] = 40.0  # a 1-voxel vessel leaving the wall
    assert not chest_wall(with_vessel)[20, 20, 11:].any()


def test_an_injection_against_the_chest_wall_is_measured_without_the_wall():
    """Measured whole, the nodule grown against the wall takes in wall: too large and too bright. With the pristine
    cube's wall left out, what is measured is the nodule: its mean HU and a diameter under its 13 mm."""
    pristine, grown = _against_the_wall()
    whole = check_quality(grown, "inject").measurement
    alone = check_quality(grown, "inject", pristine_hu=pristine)
    assert whole.diameter_mm > 15 and whole.mean_hu > -20  # real nodules > 10 mm: -182 to -40 HU
    assert 10 < alone.measurement.diameter_mm < 13 and alone.kept
    assert alone.measurement.mean_hu == pytest.approx(-60.0, abs=1.0)
    lone = np.where(grown == -60.0, -60.0, -850.0)  # the same nodule away from any wall: nothing is left out
    assert check_quality(lone, "inject", pristine_hu=np.full_like(lone, -850.0)).measurement == measure_nodule(lone)


def test_a_removal_is_measured_whole_even_with_the_pristine_cube():
    """A juxtapleural nodule merged with the wall in the pristine cube would be left out with it, and a removal
    that left it in place would pass: a removal ignores the pristine cube."""
    pristine, grown = _against_the_wall()
    assert not check_quality(grown, "remove", pristine_hu=grown).kept


def test_measuring_refuses_a_leave_out_mask_of_another_shape():
    with pytest.raises(ValueError, match="leave_out must have the cube's shape"):
        measure_nodule(_cube(4.0), leave_out=np.zeros((20, 20, 20), bool))
    with pytest.raises(ValueError, match="pristine_hu must have cube_hu's shape"):
        check_quality(_cube(4.0), "inject", pristine_hu=_cube(4.0)[:20, :20, :20])


def test_keep_rule():
    assert check_quality(_cube(6.5), "inject").kept  # 13 mm > 10 mm
    assert not check_quality(_cube(4.0), "inject").kept  # 8 mm
    assert check_quality(_cube(0.0), "remove").kept  # nothing left
    assert check_quality(_cube(3.0), "remove").kept  # 6 mm benign
    result = check_quality(_cube(6.0), "remove")
    assert not result.kept and "remaining nodule" in result.reason
    assert not check_quality(_cube(6.5), "inject", QualityCriteria(inject_min_diameter_mm=15.0)).kept
    with pytest.raises(ValueError, match="task"):
        check_quality(_cube(3.0), "swap")
    with pytest.raises(ValueError, match="cubic"):
        measure_nodule(np.zeros((32, 32, 30)))


# -- the target nodule masks of mask-conditioned generators ---------------------------------------


@pytest.mark.parametrize("diameter_mm", [5.0, 12.0, 16.5])
def test_random_nodule_masks_have_the_asked_volume_and_stay_inside_the_hole(diameter_mm):
    rng = np.random.default_rng(1)
    masks = [random_nodule_mask(rng, diameter_mm) for _ in range(6)]
    inside = hole_mask((CUBE_SIZE,) * 3, HOLE_SIZE - 2)
    for mask in masks:
        assert mask.shape == (CUBE_SIZE,) * 3 and not (mask & ~inside).any()
        assert abs((6 * mask.sum() / np.pi) ** (1 / 3) - diameter_mm) < 0.3
        assert ndimage.label(mask, np.ones((3, 3, 3)))[1] == 1 and mask[15:17, 15:17, 15:17].all()
    assert len({mask.tobytes() for mask in masks}) == len(masks)  # every draw its own shape
    np.testing.assert_array_equal(
        random_nodule_mask(np.random.default_rng(7), diameter_mm),
        random_nodule_mask(np.random.default_rng(7), diameter_mm),
    )
    with pytest.raises(ValueError, match="fit the hole"):
        random_nodule_mask(rng, 19.0)


def test_random_nodule_masks_are_lobulated_not_balls():
    """The shapes are not spheres: their surface is larger than a ball's of the same volume."""
    rng = np.random.default_rng(2)
    ratios = []
    for _ in range(10):
        mask = random_nodule_mask(rng, 14.0)
        surface = (mask & ~ndimage.binary_erosion(mask)).sum()
        ball = (
            distance_from_centre_mm(mask.shape) <= np.sort(distance_from_centre_mm(mask.shape).ravel())[mask.sum() - 1]
        )
        ratios.append(surface / (ball & ~ndimage.binary_erosion(ball)).sum())
    assert np.median(ratios) > 1.1


@pytest.mark.parametrize("task", ["inject", "remove"])
def test_a_nodule_drawn_solid_in_a_target_mask_passes_the_keep_rule(task):
    """The default diameters of `TARGET_NODULE_DIAMETER_MM` give nodules the builder keeps when a generator fills
    the mask with solid tissue: > 10 mm for an injection, < 8 mm for a removal, as the quality check measures."""
    rng = np.random.default_rng(3)
    for _ in range(20):
        mask = random_nodule_mask(rng, sample_target_diameter_mm(rng, task, None))
        cube_hu = np.where(mask, 20.0, -850.0)
        result = check_quality(cube_hu, task)
        assert result.kept, result.reason
        measured = nodule_mask(cube_hu)
        assert not (measured & ~mask).any() and measured.sum() == result.measurement.volume_mm3


def test_bank_masks_are_the_banks_shapes_turned_and_of_the_asked_size():
    rng = np.random.default_rng(4)
    hole = hole_mask((CUBE_SIZE,) * 3)
    bank = np.stack([random_nodule_mask(rng, d)[hole].reshape(20, 20, 20) for d in (6.0, 12.0, 16.0)])
    sizes = bank.reshape(3, -1).sum(1)
    for _ in range(10):
        mask = bank_nodule_mask(rng, bank)
        assert mask.shape == (CUBE_SIZE,) * 3 and not (mask & ~hole).any() and mask.sum() in sizes
    assert bank_nodule_mask(rng, bank, 11.0).sum() == sizes[1]
    assert bank_nodule_mask(rng, bank, (14.0, 20.0)).sum() == sizes[2]
    assert bank_nodule_mask(rng, bank, (30.0, 40.0)).sum() == sizes[2]  # none inside: the nearest
    turned = {bank_nodule_mask(np.random.default_rng(seed), bank[1:2]).tobytes() for seed in range(8)}
    assert len(turned) > 1  # flips and quarter turns
    np.testing.assert_allclose(equivalent_diameter_mm(bank), [6.0, 12.0, 16.0], atol=0.3)


def _ball_mask(radius_vox: float, centre=(15.5, 15.5, 15.5)) -> np.ndarray:
    grid = np.indices((CUBE_SIZE,) * 3).astype(float)
    return np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre))) <= radius_vox


def test_a_mask_that_fits_the_hole_is_kept_as_it_is():
    mask = _ball_mask(6.0)
    np.testing.assert_array_equal(fit_mask_in_hole(mask), mask[hole_mask()].reshape((HOLE_SIZE,) * 3))


def test_a_mask_larger_than_the_hole_is_scaled_to_fit_it_keeping_its_shape():
    """A 24 mm ball (the hole is 20 mm) comes back as a 20 mm ball inside the hole, not as a block cut by it."""
    fitted = fit_mask_in_hole(_ball_mask(12.0))
    cut = _ball_mask(12.0)[hole_mask()].reshape((HOLE_SIZE,) * 3)
    assert fitted[0].sum() < 0.2 * cut[0].sum() and not fitted[0, 0].any()  # touches a face, no edge or corner
    assert equivalent_diameter_mm(fitted[None])[0] == pytest.approx(20.0, abs=1.0)
    assert np.array_equal(fitted, np.flip(fitted, 0)) and np.array_equal(fitted, fitted.transpose(2, 1, 0))


def test_a_vessel_leaving_the_nodule_stays_and_does_not_count_as_the_nodule():
    """A 2-voxel vessel from a 10 mm nodule to the cube's face: the nodule fits the hole, so the mask is kept as it
    is, vessel included (cut by the hole as vessels are); a 22 mm nodule with it is scaled to fit the hole, not
    dropped as a nodule that the cube cuts."""
    vessel = np.zeros((CUBE_SIZE,) * 3, bool)
    vessel[15:17, 15:17, 15:] = True
    with_vessel = _ball_mask(5.0) | vessel
    np.testing.assert_array_equal(fit_mask_in_hole(with_vessel), with_vessel[hole_mask()].reshape((HOLE_SIZE,) * 3))
    large = fit_mask_in_hole(_ball_mask(11.0) | vessel)
    assert large is not None and 16.0 < equivalent_diameter_mm(large[None])[0] < 20.5


def test_a_nodule_cut_by_the_cube_has_no_mask():
    assert fit_mask_in_hole(_ball_mask(17.0)) is None  # 34 mm: the cube cuts it
    with pytest.raises(ValueError, match="mask must have shape"):
        fit_mask_in_hole(np.zeros((20, 20, 20), bool))
