"""The issue-13 measures of benchmarks/eval_demo_pipelines.py and the two-sample test, on synthetic cubes."""

import importlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import ndimage

from m3d.data.ct import CTVolume
from m3d.tamper.cube import extract_cube, hole_mask
from m3d.tamper.touch_up import hole_feather

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
eval_demo = importlib.import_module("eval_demo_pipelines")
two_sample = importlib.import_module("two_sample_test")
chest_wall_check = importlib.import_module("chest_wall_check")
mask_following = importlib.import_module("mask_following")
pristine_spread = importlib.import_module("pristine_spread")
slice_phase = importlib.import_module("slice_phase")
paste_check = importlib.import_module("paste_check")


@pytest.fixture(scope="module")
def lung_cubes() -> np.ndarray:
    """Four 32^3 lung cubes (-850 HU), each with a 0 HU tube of radius 1.5 mm along x passing 6.5 mm
    from the centre (through the hole's shell) and a 3 mm-radius nodule at the centre, blurred (sigma
    0.7 mm, as a scanner) and with noise (30 HU)."""
    z, y, x = np.indices((32, 32, 32)) - 15.5
    anatomy = np.full((32, 32, 32), -850.0, np.float32)
    anatomy[(np.hypot(z, y + 6.5) <= 1.5) | (np.sqrt(z**2 + y**2 + x**2) <= 3.0)] = 0.0
    anatomy = ndimage.gaussian_filter(anatomy, 0.7)
    return (anatomy + np.random.default_rng(0).normal(0.0, 30.0, (4, 32, 32, 32))).astype(np.float32)


def _slice_striped(cubes: np.ndarray, phases: list[float], amplitude_hu: float = 40.0) -> np.ndarray:
    """``cubes`` with their holes' z planes modulated at period 2.5 voxels, cube i at phase ``phases[i]``."""
    z = np.indices((32, 32, 32))[0]
    return np.stack(
        [
            cube + np.where(hole_mask(), amplitude_hu * np.cos(2 * np.pi * z / 2.5 + phase), 0.0)
            for cube, phase in zip(cubes, phases)
        ]
    ).astype(np.float32)


def test_checkerboard_raises_the_spectral_peak(lung_cubes):
    parity = np.indices((32, 32, 32)).sum(0) % 2 * 2 - 1
    checkered = lung_cubes + np.where(hole_mask(), 100.0 * parity, 0.0).astype(np.float32)
    plain_peak, checkered_peak = eval_demo.spectral_peak_ratio(lung_cubes), eval_demo.spectral_peak_ratio(checkered)
    plain_nyquist, checkered_nyquist = (
        eval_demo.nyquist_power_fraction(lung_cubes),
        eval_demo.nyquist_power_fraction(checkered),
    )
    assert checkered_peak > 10 * plain_peak
    assert checkered_nyquist > 0.3 and checkered_nyquist > 10 * plain_nyquist


def test_spectral_peak_names_the_frequency_of_a_planted_pattern(lung_cubes):
    """Planes 40 HU brighter every 2.5 voxels along z (a thick-slice period) peak at index +-8 along z (20 / 2.5)."""
    striped = _slice_striped(lung_cubes, [0.0] * len(lung_cubes))
    ratio, peak_bin = eval_demo.spectral_peak(striped)
    assert abs(peak_bin[0]) == 8 and peak_bin[1:] == (0, 0)
    assert ratio == eval_demo.spectral_peak_ratio(striped) > 10 * eval_demo.spectral_peak_ratio(lung_cubes)


def test_pristine_spread_measures_each_set_and_summarizes_the_sets(monkeypatch, tmp_path, lung_cubes):
    """Each set gives its sites' spectral peak and the two-sample accuracy of its real cubes against the
    reference's; a set without removal sites gives None there, and the summary leaves it out."""
    striped = _slice_striped(lung_cubes, [0.0] * len(lung_cubes))
    empty = lung_cubes[:0]
    sets = {
        2024: {"inject": lung_cubes, "remove": striped},
        10: {"inject": lung_cubes[::-1].copy(), "remove": striped[::-1].copy()},
        11: {"inject": lung_cubes, "remove": empty},
    }
    monkeypatch.setattr(pristine_spread, "held_out_cubes", lambda n, seed, **kwargs: (sets[seed], []))
    report = pristine_spread.main(
        ["--sets", "2", "--phantoms", "1", "--seed", "10", "--out", str(tmp_path / "s.json")]
    )
    first, second = report["sets"]
    assert first["remove"]["spectral_peak_ratio"] > 10 * first["inject"]["spectral_peak_ratio"]
    assert abs(first["remove"]["spectral_peak_bin"][0]) == 8
    assert 0.0 <= first["inject"]["two_sample_accuracy"] <= 1.0  # the set's remove cubes against the reference's
    assert second["remove"] == {
        "sites": 0,
        "spectral_peak_ratio": None,
        "spectral_peak_bin": None,
        "two_sample_accuracy": second["remove"]["two_sample_accuracy"],
    }
    assert second["inject"]["two_sample_accuracy"] is None  # no real nodule cubes in this set
    peak = report["remove"]["spectral_peak_ratio"]
    assert peak["values"] == [first["remove"]["spectral_peak_ratio"], None]
    assert peak["median"] == pytest.approx(peak["values"][0], abs=1e-3) and peak["range"] == [peak["values"][0]] * 2
    assert json.loads((tmp_path / "s.json").read_text())["seeds"] == [10, 11]


def test_slice_phase_tells_a_fixed_pattern_from_the_slices_of_each_scan(lung_cubes):
    """A modulation at the same phase in every hole concentrates the phases (about 1); one whose phase differs
    from site to site, as the real slices', does not; the amplitude comes back in HU."""
    fixed = _slice_striped(lung_cubes, [0.3] * 4)
    scattered = _slice_striped(lung_cubes, [0.0, np.pi / 2, np.pi, 3 * np.pi / 2])
    fixed_amplitudes = slice_phase.plane_modulation(fixed)
    assert np.allclose(np.abs(fixed_amplitudes), 40.0, rtol=0.25)
    assert slice_phase.phase_concentration(fixed_amplitudes) > 0.95
    assert slice_phase.phase_concentration(slice_phase.plane_modulation(scattered)) < 0.2
    assert np.median(np.abs(slice_phase.plane_modulation(lung_cubes))) < 5.0
    with pytest.raises(ValueError, match="cubes must be"):
        slice_phase.plane_modulation(lung_cubes[:, :20])


def _scan_with_removal_sites(seed: int, sites: int) -> tuple[list, np.ndarray]:
    """A lung-noise scan of 2.5 mm slices with ``sites`` removal sites spread over one slice, as `held_out_cubes`
    gives scans, and the sites' pristine cubes."""
    hu = np.random.default_rng(seed).normal(-850.0, 25.0, (40, 64, 64)).round().astype(np.int16)
    case = SimpleNamespace(volume=CTVolume(hu, spacing_mm=(2.5, 1.0, 1.0)), lung_mask=np.ones(hu.shape, bool))
    locations = [np.array([31.5, 31.5, 40.0 + 2.5 * k / sites]) for k in range(sites)]  # LPS x, y, z
    pristine = np.stack([extract_cube(case.volume, spot, lung_mask=case.lung_mask).hu for spot in locations])
    return [(case, {"inject": [], "remove": locations})], pristine


def test_in_the_scan_resamples_a_fixed_pattern_onto_each_scans_slices(lung_cubes):
    """A pristine cube pasted back comes out as it was; a z-stripe at the slice period painted at one phase into
    every hole is sampled by the scan's 2.5 mm slices at the same point of its period on every slice: a constant
    per site, so what the scan holds keeps almost nothing of the stripe."""
    scans, pristine = _scan_with_removal_sites(seed=0, sites=8)
    assert np.array_equal(eval_demo.in_the_scan(pristine, np.zeros_like(pristine), scans, "remove"), pristine)
    striped = _slice_striped(pristine, [0.3] * len(pristine))
    assert slice_phase.phase_concentration(slice_phase.plane_modulation(striped)) > 0.95
    hole = np.broadcast_to(hole_mask(), striped.shape)
    recut = slice_phase.plane_modulation(eval_demo.in_the_scan(striped, hole, scans, "remove"))
    assert np.median(np.abs(recut)) < 2.0  # of the 40 HU stripe
    with pytest.raises(ValueError, match="7 cubes and 8 replaced weights for the 8 remove sites"):
        eval_demo.in_the_scan(striped[:7], hole, scans, "remove")


def test_measure_draw_also_measures_what_the_scan_holds():
    """With the sites' scans, a draw's figures also hold the same figures of the cubes pasted into the scans and
    cut again (`in_the_scan`), which differ from the cube's; the mean over draws keeps the view apart."""
    from m3d.pipelines import Pix2Pix3DPipeline

    scans, pristine = _scan_with_removal_sites(seed=1, sites=6)
    pipe = Pix2Pix3DPipeline.from_preset("tiny", task="remove")
    generated, figures, _ = eval_demo.measure_draw(pipe, pristine, pristine[::-1].copy(), (-100.0, 100.0), 0, scans)
    in_scan = figures["in_the_scan"]
    assert in_scan["n"] == len(pristine) and 0.0 <= in_scan["two_sample_accuracy"] <= 1.0
    assert in_scan["seam_ratio_mean"] != figures["seam_ratio_mean"]
    replaced = eval_demo.generate(pipe, pristine, seed=0)[1]
    assert replaced.shape == pristine.shape and replaced[:, ~hole_mask()].max() == 0.0
    recut = eval_demo.in_the_scan(generated, replaced, scans, "remove")
    assert in_scan["seam_ratio_mean"] == pytest.approx(
        np.mean([eval_demo.seam_ratio(cube) for cube in recut]), abs=1e-3
    )
    _, other, _ = eval_demo.measure_draw(pipe, pristine, pristine[::-1].copy(), (-100.0, 100.0), 1, scans)
    mean = eval_demo.mean_over_draws([figures, other])["in_the_scan"]
    assert mean["kept_fraction_range"] == sorted(
        [figures["in_the_scan"]["kept_fraction"], other["in_the_scan"]["kept_fraction"]]
    )


def test_measure_draw_tests_an_injector_against_real_nodules_at_the_same_sites(lung_cubes):
    """With ``oracle_hu`` (real nodules pasted into the same sites), a draw also gives the paired two-sample figure,
    and the mean over draws its range; without it, no such figure."""
    from m3d.pipelines import Pix2Pix3DPipeline

    pipe = Pix2Pix3DPipeline.from_preset("tiny", task="inject")
    real = lung_cubes[::-1].copy()
    _, figures, _ = eval_demo.measure_draw(pipe, lung_cubes, real, (-100.0, 100.0), 0, oracle_hu=real)
    _, other, _ = eval_demo.measure_draw(pipe, lung_cubes, real, (-100.0, 100.0), 1, oracle_hu=lung_cubes)
    assert 0.0 <= figures["two_sample_vs_oracle"] <= 1.0
    mean = eval_demo.mean_over_draws([figures, other])
    assert mean["two_sample_vs_oracle_range"] == sorted(
        [figures["two_sample_vs_oracle"], other["two_sample_vs_oracle"]]
    )
    _, without, _ = eval_demo.measure_draw(pipe, lung_cubes, real, (-100.0, 100.0), 0)
    assert "two_sample_vs_oracle" not in without


def test_slice_phase_measures_a_shipped_pipeline_in_its_cube_and_in_the_scan(tmp_path):
    folder = eval_demo.DEMO_DIR / "pix2pix-remove"
    out = tmp_path / "p.json"
    report = slice_phase.main(["--phantoms", "1", "--seed", "0", "--pipelines", str(folder), "--out", str(out)])
    assert report["pristine"]["remove"]["sites"] == 2
    measured = report["pipelines"]["pix2pix-remove"]
    assert measured["task"] == "remove"
    for view in ("cube", "in_the_scan"):
        figures = measured[view]
        assert figures["sites"] == 2 and 0.0 <= figures["phase_concentration"] <= 1.0
        line = figures["slice_bin"]
        assert line["power"] > 0 and line["ratio"] == pytest.approx(line["power"] / line["background"], rel=0.01)
    assert measured["cube"] != measured["in_the_scan"]
    assert json.loads(out.read_text())["pipelines"] == report["pipelines"]
    assert report["slice_free"]["sites"] == 2 and report["slice_free"]["amplitude_hu_median"] < 5.0  # no slices
    assert measured["without_slices"]["sites"] == 2 and measured["without_slices"] != report["slice_free"]


def test_vessel_continuity_kept_and_cut(lung_cubes):
    assert eval_demo.vessel_continuity(lung_cubes, lung_cubes) == 1.0
    assert eval_demo.vessel_faces_continuity(lung_cubes) > 0.95
    flat = np.where(hole_mask(), np.float32(-850.0), lung_cubes)
    assert eval_demo.vessel_continuity(flat, lung_cubes) < 0.05
    assert eval_demo.vessel_faces_continuity(flat) < 0.05


def test_central_nodule_is_not_a_vessel(lung_cubes):
    nodule = eval_demo.central_nodule_mask(lung_cubes[0])
    assert nodule[16, 16, 16] and not nodule[16, 9, 16]  # the nodule, not the tube beside it


def test_two_sample_accuracy_separates_and_controls():
    rng = np.random.default_rng(1)
    plain = two_sample.synthetic_cubes(60, rng)
    sphere = two_sample.synthetic_cubes(30, rng, sphere_radius_mm=4.0)
    different = two_sample.two_sample_accuracy(plain[:30], sphere, seed=0, repeats=2)
    same = two_sample.two_sample_accuracy(plain[:30], plain[30:], seed=0, repeats=2)
    assert different["accuracy"] >= 0.9 and [len(folds) for folds in different["fold_accuracies"]] == [5, 5]
    assert same["accuracy"] <= 0.7
    assert (same["n_a"], same["n_b"], same["repeats"]) == (30, 30, 2)
    assert same["accuracy"] == pytest.approx(np.mean(same["fold_accuracies"]), abs=5e-4)
    assert two_sample.two_sample_accuracy(plain[:30], plain[30:], seed=0, repeats=2) == same  # seeded
    second = two_sample.two_sample_accuracy(plain[:30], sphere, seed=1, repeats=1)  # repeat k: seed + k
    assert second["fold_accuracies"] == different["fold_accuracies"][1:]


def test_paired_two_sample_keeps_each_sites_two_cubes_in_one_fold():
    """Paired sets (cube i of each at site i): every fold holds both cubes of its sites, the folds cover every cube
    once, and the test still tells a sphere from none at the same sites; sets of unequal size are refused."""
    folds = two_sample.site_folds(7, 3, np.random.default_rng(0))
    assert sorted(np.concatenate(folds).tolist()) == list(range(14))
    for fold in folds:
        assert sorted(fold[fold >= 7] - 7) == sorted(fold[fold < 7])
    rng = np.random.default_rng(2)
    sites = two_sample.synthetic_cubes(20, rng)
    with_sphere = sites.copy()
    with_sphere[:, eval_demo.distance_from_centre_mm(sites.shape[1:]) <= 4.0] = 0.0
    result = two_sample.two_sample_accuracy(sites, with_sphere, seed=0, repeats=1, paired=True)
    assert result["accuracy"] >= 0.9 and result["folds"] == 5
    with pytest.raises(ValueError, match="one cube per site"):
        two_sample.two_sample_accuracy(sites, with_sphere[:-1], paired=True)


def test_oracle_control_pastes_two_disjoint_halves_of_the_real_nodules_at_the_same_sites(monkeypatch):
    """The control of two_sample_vs_oracle: each draw tells real nodules of one half from those of the other half,
    at the same sites, with the paired test; the figure is the mean of the draws."""
    sites = np.stack([np.full((32, 32, 32), -800.0 - i, np.float32) for i in range(3)])
    real = np.stack([_ball_cube(6.0, 10.0 * i, background_hu=-900.0) for i in range(6)])
    ball = eval_demo.distance_from_centre_mm((32, 32, 32)) <= 6.0
    calls = []

    def recorded(a, b, seed=0, **options):
        calls.append((a, b, options))
        return {"accuracy": 0.5 + 0.1 * len(calls)}

    monkeypatch.setattr(eval_demo, "two_sample_accuracy", recorded)
    control = eval_demo.two_sample_oracle_control(sites, real, draws=2)
    assert control == {"accuracy": 0.65, "accuracy_range": [0.6, 0.7], "draws": 2, "real_nodules_per_half": 3}
    for a, b, options in calls:
        assert options == {"paired": True}
        for pasted, site in zip(np.concatenate([a, b]), np.concatenate([sites, sites])):
            assert np.array_equal(pasted[~ball], site[~ball])
        assert not set(np.unique(a[:, ball])) & set(np.unique(b[:, ball]))  # no nodule on both sides
    assert eval_demo.two_sample_oracle_control(sites, real[:1], draws=1) is None


def test_sites_at_the_chest_wall_are_told_by_their_context():
    """A cube whose context is one third thick dense tissue (a wall) is at the chest wall; lung with vessels thinner
    than the opening ball, and whatever fills the hole, do not count."""
    lung = np.full((32, 32, 32), -850.0, np.float32)
    lung[:, 10:12, :] = 40.0  # a 2 mm vessel sheet: thinner than the 3 mm ball
    lung[8:24, 8:24, 8:24] = 60.0  # a 16 mm nodule in the hole
    wall = lung.copy()
    wall[:, :, :11] = 40.0  # the chest wall: 11 of 32 columns
    assert eval_demo.chest_wall_fraction(lung) < 0.05
    assert eval_demo.chest_wall_fraction(wall) > eval_demo.CHEST_WALL_SITE_FRACTION
    split = eval_demo.real_looking_by_chest_wall(np.array([True, False, True]), np.stack([wall, wall, lung]))
    assert split == {"at_chest_wall": {"n": 2, "fraction": 0.5}, "away_from_chest_wall": {"n": 1, "fraction": 1.0}}


def test_a_bank_mask_cut_by_the_hole_lies_along_its_faces():
    inside, cut = np.zeros((2, 20, 20, 20), bool)
    inside[7:13, 7:13, 7:13] = True
    cut[5:15, 5:15, 0:10] = True  # a nodule the hole's face cuts: a 10 x 10 patch on it
    assert mask_following.face_voxels(np.stack([inside, cut])).tolist() == [0, 100]
    assert mask_following.dice(inside, inside) == 1.0
    assert mask_following.dice(inside, cut) == pytest.approx(2 * 6 * 6 * 3 / (6**3 + 10**3))  # they share 6x6x3


def _ball_cube(radius_mm: float, hu: float, background_hu: float = -850.0) -> np.ndarray:
    """A 32^3 cube of ``background_hu`` with a centred ball of ``hu``."""
    cube = np.full((32, 32, 32), background_hu, np.float32)
    cube[eval_demo.distance_from_centre_mm(cube.shape) <= radius_mm] = hu
    return cube


def test_real_looking_ceiling_is_the_share_of_real_kept_nodules_inside_the_range(monkeypatch):
    """Of the real nodules at the other phantoms' removal sites, those kept by the injection rule (> 10 mm)
    count, and the ceiling is the share of them whose mean HU lies in the range; none left: None."""
    cubes = {"remove": np.stack([_ball_cube(7.0, -100.0), _ball_cube(7.0, -10.0), _ball_cube(2.5, -100.0)])}
    monkeypatch.setattr(eval_demo, "held_out_cubes", lambda *args, **kwargs: (cubes, []))
    real_nodules = eval_demo.ceiling_nodules(3, 7, 320, 48, "native")
    assert len(real_nodules) == 2  # the 5 mm ball is not > 10 mm
    ceiling = eval_demo.real_looking_ceiling(real_nodules, (-182.0, -40.0))
    away = {"at_chest_wall": {"n": 0, "fraction": None}, "away_from_chest_wall": {"n": 2, "fraction": 0.5}}
    assert ceiling == {"n": 2, "fraction": 0.5, "by_site": away}
    assert len(eval_demo.ceiling_nodules(0, 7, 320, 48, "native")) == 0
    assert eval_demo.real_looking_ceiling(real_nodules[:0], (-182.0, -40.0)) is None


def test_oracle_injections_paste_real_nodules_into_the_sites_holes_only():
    """Each site gets one real cube's central nodule inside the hole, each real nodule used once while they last;
    the site's own voxels everywhere else (its context, and the real cube's lung around the nodule)."""
    sites = np.stack([np.full((32, 32, 32), -800.0 - i, np.float32) for i in range(3)])
    real = np.stack([_ball_cube(6.0, 40.0 + 10 * i, background_hu=-900.0) for i in range(3)])
    real[:, 0, 0, 0] = 100.0  # bright tissue in the corner, outside the hole: never pasted
    oracle = eval_demo.oracle_injections(sites, real, seed=0)
    ball = eval_demo.distance_from_centre_mm((32, 32, 32)) <= 6.0
    assert sorted(np.unique(oracle[:, ball]).tolist()) == [40.0, 50.0, 60.0]
    for pasted, site in zip(oracle, sites):
        assert np.array_equal(pasted[~ball], site[~ball])
    twice = eval_demo.oracle_injections(np.concatenate([sites, sites]), real[:1], seed=1)
    assert (twice[:, ball] == 40.0).all()  # fewer real nodules than sites: drawn again
    assert eval_demo.two_sample_oracle(sites, real[:0], real, draws=1) is None


def test_oracle_removals_feather_real_lung_into_the_holes_and_measure_their_peak_in_the_scan():
    """Each removal site's hole takes a real lung cube's hole, whole inside the feather and blended over the hole's
    faces, each real cube once while they last; the context stays the site's. The oracle's peak is measured on
    those cubes and on what the scan holds once they are pasted into it: a stripe the scan's slices cannot hold
    peaks in the cube and not in the scan."""
    sites = np.stack([np.full((32, 32, 32), -800.0 - i, np.float32) for i in range(3)])
    lung = np.stack([np.full((32, 32, 32), -900.0 + 10 * i, np.float32) for i in range(3)])
    oracle = eval_demo.oracle_removals(sites, lung, seed=0)
    hole, centre = hole_mask(), (slice(12, 20),) * 3
    assert sorted(np.unique(oracle[(slice(None), *centre)]).tolist()) == [-900.0, -890.0, -880.0]
    for filled, site in zip(oracle, sites):
        assert np.array_equal(filled[~hole], site[~hole])
        assert np.unique(filled[hole]).size > 2  # the feather's blend between the site and the real lung
    twice = eval_demo.oracle_removals(np.concatenate([sites, sites]), lung[:1], seed=1)
    assert (twice[(slice(None), *centre)] == -900.0).all()  # fewer real cubes than sites: drawn again

    scans, removal_sites = _scan_with_removal_sites(seed=0, sites=4)
    lung_noise = np.random.default_rng(1).normal(-850.0, 25.0, (5, 32, 32, 32))
    real_lung = _slice_striped(lung_noise, [0.3] * 5)  # a stripe at the slice period, which the scan's slices drop
    peaks = eval_demo.spectral_peak_oracle(removal_sites, real_lung, scans, draws=2)
    filled = [eval_demo.oracle_removals(removal_sites, real_lung, seed) for seed in (0, 1)]
    cube = [round(eval_demo.spectral_peak_ratio(cubes), 2) for cubes in filled]
    feather = np.broadcast_to(hole_feather(), removal_sites.shape)
    recut, grain = zip(*(eval_demo.pasted_in_the_scan(cubes, feather, scans, "remove") for cubes in filled))
    scan = [round(eval_demo.spectral_peak_ratio(cubes), 2) for cubes in recut]
    assert peaks == {
        "cube": round(float(np.mean(cube)), 2),
        "cube_range": sorted(cube),
        "in_the_scan": round(float(np.mean(scan)), 2),
        "in_the_scan_range": sorted(scan),
        "finest_grain_in_the_scan": eval_demo.median_of_found(list(grain)),
        "draws": 2,
        "real_lung_cubes": 5,
    }
    assert peaks["in_the_scan"] < peaks["cube"] / 2
    assert eval_demo.spectral_peak_oracle(removal_sites, real_lung[:0], scans, draws=1) is None


def test_proportion_interval_is_wilsons_and_checks_its_input():
    assert eval_demo.proportion_interval(0, 10) == pytest.approx([0.0, 0.278], abs=1e-3)
    assert eval_demo.proportion_interval(10, 10) == pytest.approx([0.722, 1.0], abs=1e-3)
    low, high = eval_demo.proportion_interval(16, 18)
    assert low < 16 / 18 < high and high - low > 0.25  # 18 sites: a wide interval
    assert eval_demo.proportion_interval(160, 180)[1] - eval_demo.proportion_interval(160, 180)[0] < high - low
    with pytest.raises(ValueError, match="successes <= n"):
        eval_demo.proportion_interval(5, 4)


def test_mean_over_draws_averages_figures_keeps_counts_and_ranges_the_targets():
    draws = [
        {"seed": 0, "n": 18, "kept_fraction": 0.889, "kept_fraction_ci95": [0.67, 0.97], "spectral_peak_ratio": 3.0,
         "diameter_mm_iqr": [4.0, 6.0], "vessel_continuity": None, "two_sample_accuracy": 0.6,
         "two_sample": {"fold_accuracies": [[0.5]]}, "by_site": {"wall": {"n": 3, "fraction": 0.5}}},
        {"seed": 1, "n": 18, "kept_fraction": 1.0, "kept_fraction_ci95": [0.82, 1.0], "spectral_peak_ratio": 4.0,
         "diameter_mm_iqr": [5.0, 7.0], "vessel_continuity": 1.2, "two_sample_accuracy": 0.7,
         "two_sample": {"fold_accuracies": [[0.7]]}, "by_site": {"wall": {"n": 3, "fraction": 1.0}}},
    ]  # fmt: skip
    mean = eval_demo.mean_over_draws(draws)
    assert mean == {
        "n": 18,
        "kept_fraction": pytest.approx(0.9445, abs=1e-3),
        "kept_fraction_range": [0.889, 1.0],
        "spectral_peak_ratio": 3.5,
        "diameter_mm_iqr": [4.5, 6.5],
        "vessel_continuity": None,  # a draw without the figure: no mean
        "two_sample_accuracy": 0.65,
        "two_sample_accuracy_range": [0.6, 0.7],
        "by_site": {"wall": {"n": 3, "fraction": 0.75}},
    }  # seed, Wilson intervals and folds stay in the draws


def test_measure_draw_gives_each_seed_its_own_draw(lung_cubes):
    from m3d.pipelines import Pix2Pix3DPipeline

    pipe = Pix2Pix3DPipeline.from_preset("tiny", task="remove")
    real = lung_cubes[::-1].copy()
    first, figures, seconds = eval_demo.measure_draw(pipe, lung_cubes, real, (-100.0, 100.0), seed=0)
    again, _, _ = eval_demo.measure_draw(pipe, lung_cubes, real, (-100.0, 100.0), seed=0)
    other, other_figures, _ = eval_demo.measure_draw(pipe, lung_cubes, real, (-100.0, 100.0), seed=1)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)  # the touch-ups' noise is the seed's
    assert figures["seed"] == 0 and other_figures["seed"] == 1 and figures["n"] == len(lung_cubes) and seconds > 0
    assert {"kept_fraction", "spectral_peak_ratio", "two_sample_accuracy", "seam_ratio_raw"} <= set(figures)
    np.testing.assert_array_equal(first[:, ~hole_mask()], lung_cubes[:, ~hole_mask()])  # only the hole is generated


@pytest.mark.parametrize("option", ["--draws", "--phantoms"])
def test_evaluation_refuses_fewer_than_one_draw_or_phantom(option, capsys):
    with pytest.raises(SystemExit):
        eval_demo.main([option, "0", "--no-montage"])
    assert "--draws and --phantoms must be at least 1" in capsys.readouterr().err


def test_evaluation_refuses_a_file_as_its_output_folder(tmp_path, capsys):
    not_a_folder = tmp_path / "demo_pipelines_quality.json"
    not_a_folder.write_text("{}")
    with pytest.raises(SystemExit):
        eval_demo.main(["--out", str(not_a_folder), "--no-montage"])
    assert "--out must be a folder" in capsys.readouterr().err


def test_paste_check_finds_what_adding_the_change_leaves_of_a_removed_nodule():
    """A dense 12 mm nodule in a scan of 2.5 mm slices and 0.7 mm pixels, its hole filled with flat lung: added as a
    change, the fill leaves part of the nodule where the 1 mm cube could not hold it, most on its rim; replacing the
    scan leaves nothing in the hole's core, and with the grain drawn anew nothing but the grain."""
    shape, spacing = (24, 80, 80), (2.5, 0.7, 0.7)
    centre = np.array([12, 40, 40])
    distance_mm = np.linalg.norm((np.indices(shape).T - centre).T * np.reshape(spacing, (3, 1, 1, 1)), axis=0)
    hu = np.where(distance_mm < 6.0, 30.0, -850.0) + np.random.default_rng(0).normal(0.0, 20.0, shape)
    case = SimpleNamespace(
        volume=CTVolume(hu.round().astype(np.int16), spacing_mm=spacing), lung_mask=np.ones(shape, bool)
    )
    location = case.volume.voxel_to_world(centre)
    pristine = extract_cube(case.volume, location, lung_mask=case.lung_mask).hu
    flat = np.where(hole_mask(), np.float32(paste_check.FLAT_LUNG_HU), pristine).astype(np.float32)
    figures = {
        rule: paste_check.left_of_the_scan(
            paste_check.pasted(case, location, flat, hole_mask().astype(np.float32), rule, 0)[1][None], pristine[None]
        )
        for rule in paste_check.RULES
    }
    added, replaced = figures["change_added"], figures["replaced"]
    assert replaced["core_max_hu"] == 0.0 and added["core_max_hu"] > 100
    assert added["removed_rim_hu"] > 2 * added["lung_hu"] and added["removed_rim_hu"] > 3 * replaced["removed_rim_hu"]
    assert added["sites_with_a_nodule"] == replaced["sites_with_a_nodule"] == 1
    grained = figures["replaced_with_grain"]  # the drawn grain alone: as much on the rim as on the lung
    assert grained["removed_rim_hu"] < 1.5 * grained["lung_hu"] and grained["core_max_hu"] < added["core_max_hu"]


def test_paste_check_measures_exact_fills_in_the_cube_and_by_each_rule_in_the_scan():
    """A 40 HU stripe at the slice period peaks in the cube; pasted into the scan of 2.5 mm slices by either rule,
    the slices keep little of it (the lung alone: about 12 everywhere)."""
    scans, sites = _scan_with_removal_sites(seed=0, sites=4)
    filled = _slice_striped(sites, [0.3] * len(sites))
    peaks = paste_check.exact_fill_peaks(filled, np.broadcast_to(hole_feather(), filled.shape), scans, "remove")
    rules = ("change_added", "replaced", "replaced_with_grain")
    assert set(peaks) == {"cube", *(f"in_the_scan_{rule}" for rule in rules), "finest_grain"}
    assert peaks["cube"] > 10_000
    assert max(peaks[f"in_the_scan_{rule}"] for rule in rules) < peaks["cube"] / 100


def test_paste_check_finds_the_grain_a_replaced_region_loses_on_fine_pixels():
    """White lung noise on 0.5 mm pixels: the 1 mm cube holds little of its grain, so a fill of the cube's own
    content replaced into the scan is smoother than the scan around it; added as a change it keeps the scan's, and
    replaced with the grain drawn anew it gets it back."""
    shape, spacing = (16, 200, 200), (2.5, 0.5, 0.5)
    hu = np.random.default_rng(0).normal(-850.0, 40.0, shape).round().astype(np.int16)
    case = SimpleNamespace(volume=CTVolume(hu, spacing_mm=spacing), lung_mask=np.ones(shape, bool))
    location = case.volume.voxel_to_world((8, 100, 100))
    site = extract_cube(case.volume, location, lung_mask=case.lung_mask).hu
    figures = paste_check.exact_fill_peaks(
        site[None], hole_mask()[None].astype(np.float32), [(case, {"remove": [location]})], "remove"
    )
    grain = {rule: site["ratio"] for rule, site in figures["finest_grain"].items()}
    assert 0.9 < grain["pristine"] < 1.1 and 0.9 < grain["change_added"] < 1.1
    assert grain["replaced"] < 0.6 and 0.8 < grain["replaced_with_grain"] < 1.2
    texture = figures["finest_grain"]["replaced_with_grain"]  # the scan's texture, here white noise's
    assert abs(texture["in_plane"] - figures["finest_grain"]["pristine"]["in_plane"]) < 0.15
