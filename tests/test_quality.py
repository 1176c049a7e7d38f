import numpy as np
import pytest

from m3d.tamper.quality import QualityCriteria, check_quality, measure_nodule


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
