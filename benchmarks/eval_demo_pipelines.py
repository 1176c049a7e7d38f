"""How real do the shipped demo pipelines' nodules look? Measured on held-out phantom sites.

    .venv/bin/python benchmarks/eval_demo_pipelines.py                  # the six pipelines/demo folders
    .venv/bin/python benchmarks/eval_demo_pipelines.py --pipelines runs/p2p/pipeline --no-montage

Held-out scans: ``--phantoms`` synthetic chest CTs made with `make_phantom` from ``SeedSequence([seed,
i])`` (default seed 2024; the demo pipelines were trained on seed 0, so the anatomy, the noise and the
sites differ; the nodule *contours* are drawn from the same LIDC database), by default as the dataset
builder makes them (`m3d.dataset_builder.generate.DEFAULT_PHANTOMS` and ``PHANTOM_NODULES``: the real
series' pixel and slice spacing, a 320-pixel field of view, 48 slices; ``--phantom-spacing scaled``
puts the real field of view on ``--size`` pixels instead). Sites as the dataset plan
(`m3d.tamper.plan.plan_scan`): injections at small benign nodules (< 8 mm), removals at real nodules
>= 8 mm with malignancy >= 3; sites whose cube leaves the scan or the lungs are skipped. Every pipeline
of a task sees the same sites.

Per pipeline, on the generated 32^3 cube (1 mm; the hole generated, the rest the scan's own voxels) as
the pipeline returns it by default (the GAN pipelines with CT-GAN's touch-ups, `m3d.tamper.touch_up`;
``seam_ratio_raw``: the seam without them), and for the pristine cubes of each task as the reference. Each
pipeline fills the sites ``--draws`` times (generation seeds 0, 1, ...: other drawn nodule masks, other sampling
noise); its figures are the mean over the draws (`mean_over_draws`; each draw's own, with its Wilson intervals
and two-sample folds, under ``draws``): at the same 18-34 sites one draw's kept fraction moved by up to 0.11
between seeds, more than one site's worth.

* the nodule at the centre, measured as the builder's check measures it (`m3d.tamper.quality.check_quality`: the
  component above -400 HU reaching the centre; an injected nodule without the site's chest wall, taken from the
  pristine cube): ``kept_fraction`` passes the builder's keep rule; injections count as
  *real-looking* when the nodule is > 10 mm (the keep rule) **and** its mean HU lies in the range of
  real nodules > 10 mm measured the same way on the same held-out scans (5th-95th percentile);
  ``real_looking_ceiling`` is what a generator that made real nodules exactly would score: the share of
  the real nodules > 10 mm at the removal sites of ``--ceiling-phantoms`` (160: about 90 nodules) *other*
  phantoms (seed + 1) whose mean HU lies in that range (a range from a few nodules leaves real ones out too).
  ``real_looking_by_site`` (and the ceiling's ``by_site``) splits it by whether the site is at the chest wall
  (`chest_wall_fraction`: at least 30 % of the cube's context, outside the hole, is tissue above -300 HU thicker
  than a 3 mm ball); ``kept_fraction_ci95`` and ``real_looking_fraction_ci95`` are their Wilson 95 % intervals
  (`proportion_interval`: with 18-34 sites, one site is worth 0.03-0.06);
* the seam (``seam_ratio_mean``): mean |HU difference| of neighbouring voxels across the hole's faces
  divided by the same mean over all other neighbouring pairs of the cube (1 = no seam);
* periodic artefacts (`spectral_peak_ratio`, `nyquist_power_fraction`): the mean power spectrum of the
  hole's high-pass residual (Hann-windowed); its sharpest peak beyond the lowest frequencies (a bin's
  power over the median of its neighbouring bins), and the share of its power at the Nyquist frequency
  of any axis, where the checkerboard of a strided transposed convolution lands;
* vessels (`vessel_continuity`, `vessel_faces_continuity`): how much bright tubular tissue (> -500 HU,
  the central nodule left out) the hole's shell around the nodule holds relative to the pristine cube
  of the site (1 = kept, 0 = cut), and the share of vessel voxels just outside the hole's faces that
  continue just inside;
* a classifier two-sample test (``two_sample_accuracy``, `two_sample_test.two_sample_accuracy`): the
  held-out balanced accuracy of a small 3-D CNN telling the generated holes from *real* holes of the
  class the generator is meant to produce (chance 0.5). Injections are generated at the injection sites
  (small benign nodules), so their real counterparts are the pristine cubes of the *removal* sites (real
  nodules >= 8 mm); removals are compared with the pristine cubes of the injection sites (real nodules
  < 8 mm); the mean of 5 repeated 5-fold cross-validations; ``two_sample`` holds each repeat's and each fold's
  accuracy and ``n_a`` (generated) / ``n_b`` (real) cubes.
  ``two_sample_control``: the same test on two random halves of each task's pristine cubes, which must
  come out at chance; ``two_sample_oracle``: the same test for an exact injector (`oracle_injections`: the
  nodules of the ceiling's real nodules > 10 mm pasted into the injection sites' holes, ``--draws`` draws): the
  injection sites' surroundings, which the hole shows, differ from those of real large nodules (nearer the chest
  wall), so even real nodules there are told apart; at most what a generator can reach here (the paste may leave
  traces of its own);
* the same question without the sites (``two_sample_vs_oracle``, injectors): the generated cubes against the oracle's
  cubes *at the same sites*, each draw against the oracle of its seed, with the folds drawn over the sites (the
  paired test, `two_sample_accuracy` with ``paired=True``), so that only what fills the hole differs: how well the
  classifier tells the generator's nodules from real ones. ``two_sample_oracle_control``: the same paired test on
  the oracle's cubes from two disjoint halves of the real nodules, which must come out at chance (it does not when
  a half holds fewer nodules than there are sites and repeats some: 80 ceiling phantoms gave 0.60-0.72, hence 160);
* speed: cubes/s of the generator on the batch of all sites, over all draws (``cubes_per_s``), and of full generation
  on whole scans, scan by scan: cut, fill, paste back (``scan_cubes_per_s``).

``in_the_scan``: the same figures (two-sample folds left out) for what the tampered scan holds: each generated cube
pasted into its own scan (`m3d.tamper.cube.paste_cube`, as the builder saves a fake: resampled onto the scan's
voxels and slices, replacing the scan by the pipeline's ``replaced`` weights, no grain drawn) and the 1 mm cube cut
there again (`in_the_scan`); with it ``finest_grain``, the tampered scan's finest in-plane grain at the site
(`finest_grain_at_site`, medians over the sites: its ``ratio`` to the grain elsewhere, the same of its noise alone
``noise_ratio``, its texture ``in_plane`` and ``through_plane``; the pristine scans' in ``pristine_finest_grain``).
A pristine cube pasted back with nothing replaced comes back exactly, so the pristine references and the real cubes
of the two-sample test are the same for both views; what the scan's resampling keeps or loses of a generator's
traces is what an examiner of the scan can see.
``spectral_peak_oracle``: the spectral peak of an exact remover (`oracle_removals`: the holes of the injection
sites' pristine cubes, real lung around a small benign nodule, feathered into the removal sites' holes, ``--draws``
draws), in the cube and in the scan: pasted into the scan, even real lung is resampled onto the scan's slices,
so in the scan a remover's peak is measured against this rather than against the pristine cube, never pasted. Its
``finest_grain_in_the_scan`` is what real lung replaced into the scan gets.

The targets of issue 13: ``kept_fraction`` >= 0.90; injections ``real_looking_fraction`` >= 0.80; seam
ratio <= 1.20; no spectral peak (``spectral_peak_ratio``, ``nyquist_power_fraction``) above the pristine
cubes' of the task; ``two_sample_accuracy`` <= 0.75 (for injectors, ``two_sample_vs_oracle`` asks the same of
the nodules alone).

Writes ``benchmarks/results/demo_pipelines_quality.json`` (device named) and, unless
``--no-montage``, ``benchmarks/results/demo_pipelines_montage.png`` (central axial slice of four sites
per task: the pristine cube, then each generator's first draw).
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from m3d.constants import FAKE_GENERATORS as GENERATORS, TASKS
from m3d.data.ct import CTVolume
from m3d.data.phantom import make_phantom
from m3d.devices import describe_device
from m3d.files import write_json_atomic
from m3d.dataset_builder.generate import DEFAULT_PHANTOMS, PHANTOM_NODULES, PHANTOM_SPACINGS
from m3d.pipelines import M3DTamperPipeline, load_pipeline
from m3d.tamper.cube import (
    CUBE_SIZE,
    GRAIN_LUNG_MAX_HU,
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
    robust_variance,
    unit_to_hu,
)
from m3d.tamper.plan import plan_scan
from m3d.tamper.quality import (
    QualityCriteria,
    QualityResult,
    central_component,
    check_quality,
    distance_from_centre_mm,
    measure_nodule,
    passes_keep_rule,
    thick_tissue,
)
from m3d.tamper.touch_up import hole_feather
from two_sample_test import two_sample_accuracy  # the script beside this one (its folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = ROOT / "pipelines" / "demo"
MONTAGE_SITES = 4
CEILING_PHANTOMS = 160  # their real nodules > 10 mm (about 90): real_looking_ceiling, the oracle, two halves >= sites
SPECTRUM_HIGHPASS_SIGMA_MM = 1.0  # residual = cube - Gaussian blur: keeps >= 70 % of a period-4 pattern
SPECTRUM_MIN_RADIUS = 2.0  # frequency bins nearer DC than this (index units of the 20-voxel hole) are ignored
SPECTRUM_BACKGROUND_BINS = 5  # a spectral peak is measured against the median of its 5^3 neighbouring bins
VESSEL_MIN_HU = -500.0  # phantom vessels are blood (35-260 HU) in lung (about -850 HU), with partial volume
SHELL_INNER_RADIUS_MM = 5.0  # the vessel shell: the hole minus the central 10 mm ball
MIN_SHELL_VESSEL_VOXELS = 10  # sites whose pristine shell holds fewer vessel voxels give no continuity ratio
DRAWS = 3  # one draw's kept fraction moved by up to 0.11 between generation seeds at the same 18-34 sites
RANGED_FIGURES = (
    "kept_fraction",
    "real_looking_fraction",
    "two_sample_accuracy",
    "two_sample_vs_oracle",
)  # also given as their range
# the finest in-plane grain (m3d.tamper.cube.finest_grain) on the lung (its GRAIN_LUNG_MAX_HU) ...
GRAIN_CORE_MM, GRAIN_FAR_MM = 5.0, 25.0  # ... within 5 mm of a site in-plane, over 25 mm or more away
GRAIN_MIN_VOXELS = 20
CHEST_WALL_SITE_FRACTION = 0.3  # a site "at the chest wall": its cube's context is at least this much wall


def demo_folders() -> list[Path]:
    """The shipped demo pipeline folders, ``<generator>-<task>``, in a fixed order."""
    return [DEMO_DIR / f"{generator}-{task}" for task in TASKS for generator in GENERATORS]


def held_out_cubes(
    n_phantoms: int,
    seed: int,
    size: int = DEFAULT_PHANTOMS["size"],
    max_slices: int | None = DEFAULT_PHANTOMS["max_slices"],
    spacing: str = DEFAULT_PHANTOMS["spacing"],
    keep_scans: bool = True,
) -> tuple[dict[str, np.ndarray], list]:
    """Pristine 32^3 HU cubes at the plan's injection and removal sites of ``n_phantoms`` new phantoms
    (the builder's nodule settings; ``spacing`` "native" | "scaled" as `phantom_jobs`), and the scans as
    ``(case, {task: [LPS locations]})`` (none unless ``keep_scans``: each holds its whole volume)."""
    cubes: dict[str, list[np.ndarray]] = {task: [] for task in TASKS}
    scans = []
    for i in range(n_phantoms):
        case = make_phantom(
            np.random.SeedSequence([seed, i]),
            size=size,
            max_slices=max_slices,
            native_spacing=spacing == "native",
            **PHANTOM_NODULES,
        )
        locations: dict[str, list[np.ndarray]] = {task: [] for task in TASKS}
        for site in plan_scan(case.lidc):
            location = case.volume.voxel_to_world(site.center_zyx)
            try:
                cubes[site.task].append(extract_cube(case.volume, location, lung_mask=case.lung_mask).hu)
            except TamperLocationError:
                continue
            locations[site.task].append(location)
        if keep_scans:
            scans.append((case, locations))
    empty = np.empty((0,) + (CUBE_SIZE,) * 3, np.float32)  # a task without a site (a few small phantoms)
    return {task: np.stack(found) if found else empty for task, found in cubes.items()}, scans


def scan_cubes_per_s(pipe: M3DTamperPipeline, scans: list) -> float:
    """Cubes/s of full generation on whole scans: cut, fill (a batch per scan) and paste back."""
    count, start = 0, time.perf_counter()
    for case, locations in scans:
        if locations[pipe.config.task]:
            pipe(
                volume=case.volume,
                locations_lps_mm=locations[pipe.config.task],
                lung_mask=case.lung_mask,
                output_type="volume",
                generator=torch.Generator().manual_seed(0),
                progress=False,
            )
            count += len(locations[pipe.config.task])
    return count / (time.perf_counter() - start)


def pasted_at_site(
    case, location: np.ndarray, cube_hu: np.ndarray, replaced: np.ndarray, grain_rng: np.random.Generator | None
) -> tuple[CTVolume, np.ndarray]:
    """``cube_hu`` pasted into the scan of ``case`` at ``location`` as the builder saves a fake (`paste_cube`,
    replacing the scan by ``replaced``, with the grain finer than the cube drawn by ``grain_rng``), and the 1 mm cube
    cut again there."""
    site = extract_cube(case.volume, location, lung_mask=case.lung_mask)
    tampered, _ = paste_cube(case.volume, site, cube_hu, replaced=replaced, grain_rng=grain_rng)
    return tampered, extract_cube(tampered, location, lung_mask=case.lung_mask).hu


def finest_grain_at_site(volume_hu: np.ndarray, case, location: np.ndarray) -> dict[str, float] | None:
    """The finest in-plane grain at a site (`finest_grain`: HU minus a 0.7-pixel in-plane blur) on the lung (below
    ``GRAIN_LUNG_MAX_HU``) within ``GRAIN_CORE_MM`` of the site in-plane, on its slice and the two beside it:
    ``ratio``, its std over the same on the lung of those slices ``GRAIN_FAR_MM`` or more away (noise and the fine
    structure of vessel and nodule edges); ``noise_ratio``, the same of its `robust_variance` (the noise's level);
    its texture, ``in_plane`` and ``through_plane`` (`neighbour_correlation`: 0 for white noise). None when either
    holds too little lung."""
    k, i, j = np.rint(case.volume.world_to_voxel(location)).astype(int)
    core, far = (int(mm / case.volume.spacing_mm[1]) for mm in (GRAIN_CORE_MM, GRAIN_FAR_MM))
    slices = slice(max(k - 1, 0), k + 2)
    slab = volume_hu[slices].astype(np.float32)
    fine = finest_grain(slab)
    lung = (slab < GRAIN_LUNG_MAX_HU) & case.lung_mask[slices]
    near = np.zeros_like(lung)
    near[:, max(i - core, 0) : i + core, max(j - core, 0) : j + core] = True
    away = np.ones_like(lung)
    away[:, max(i - far, 0) : i + far, max(j - far, 0) : j + far] = False
    near_lung, far_lung = lung & near, lung & away
    if near_lung.sum() < GRAIN_MIN_VOXELS or far_lung.sum() < 10 * GRAIN_MIN_VOXELS:
        return None
    return {
        "ratio": float(fine[near_lung].std() / fine[far_lung].std()),
        "noise_ratio": float(np.sqrt(robust_variance(fine[near_lung]) / robust_variance(fine[far_lung]))),
        "in_plane": neighbour_correlation(fine, near_lung, IN_PLANE),
        "through_plane": neighbour_correlation(fine, near_lung, THROUGH_PLANE),
    }


def median_of_found(figures: list[dict[str, float] | None]) -> dict[str, float] | None:
    """Each figure's median (2 decimals) over the dicts that are not None (NaN figures left out); None if none is."""
    found = [site for site in figures if site is not None]
    if not found:
        return None
    return {key: round(float(np.nanmedian([site[key] for site in found])), 2) for key in found[0]}


def task_sites(scans: list, task: str) -> list[tuple]:
    """``[(case, location)]`` of ``task``'s sites in ``scans`` (as `held_out_cubes` gives them), in the cubes'
    order."""
    return [(case, location) for case, locations in scans for location in locations[task]]


def in_the_scan(cubes_hu: np.ndarray, replaced: np.ndarray, scans: list, task: str) -> np.ndarray:
    """The 1 mm cubes cut again from the tampered scans of `pasted_in_the_scan`."""
    return pasted_in_the_scan(cubes_hu, replaced, scans, task)[0]


def pasted_in_the_scan(
    cubes_hu: np.ndarray, replaced: np.ndarray, scans: list, task: str
) -> tuple[np.ndarray, dict[str, float] | None]:
    """Each cube of ``task``'s sites pasted into its own scan (``scans`` as `held_out_cubes` gives them, in the same
    order as the cubes), replacing the scan by its ``replaced`` weights (`paste_cube`; the pipeline's output gives
    them; no grain drawn, as the pipelines paste), and the 1 mm cube cut again there: what the tampered scan holds,
    one site at a time; with the medians over the sites of the tampered scans' `finest_grain_at_site` (None where no
    site has the lung to measure it)."""
    sites = task_sites(scans, task)
    if len(sites) != len(cubes_hu) or len(replaced) != len(cubes_hu):
        raise ValueError(
            f"{len(cubes_hu)} cubes and {len(replaced)} replaced weights for the {len(sites)} {task} sites of the "
            "scans"
        )
    recut, grain = [], []
    for (case, location), cube_hu, share in zip(sites, cubes_hu, replaced):
        tampered, again = pasted_at_site(case, location, cube_hu, share, grain_rng=None)
        recut.append(again)
        grain.append(finest_grain_at_site(tampered.hu, case, location))
    return np.stack(recut), median_of_found(grain)


def seam_ratio(cube_hu: np.ndarray) -> float:
    """Mean |HU step| between neighbours across the hole's faces over the mean step everywhere else."""
    hole = hole_mask(cube_hu.shape)
    across, elsewhere = [], []
    for axis in range(3):
        step = np.abs(np.diff(cube_hu, axis=axis))
        straddles = np.diff(hole.astype(np.int8), axis=axis) != 0
        across.append(step[straddles])
        elsewhere.append(step[~straddles])
    return float(np.concatenate(across).mean() / np.concatenate(elsewhere).mean())


def hole_power_spectrum(cubes_hu: np.ndarray) -> np.ndarray:
    """Mean power spectrum (``np.fft`` order, ``HOLE_SIZE``^3) of the holes' high-pass residual: cube
    minus its Gaussian blur (sigma `SPECTRUM_HIGHPASS_SIGMA_MM`, so the nodule and vessels, which differ
    between pristine and generated cubes by design, do not dominate), hole cut out, its mean removed,
    3-D Hann window, |FFT|^2, averaged over the cubes."""
    cubes = np.asarray(cubes_hu, np.float32)
    residual = cubes - ndimage.gaussian_filter(cubes, (0,) + (SPECTRUM_HIGHPASS_SIGMA_MM,) * 3)
    holes = residual[:, hole_mask(cubes.shape[1:])].reshape((len(cubes),) + (HOLE_SIZE,) * 3)
    holes -= holes.mean(axis=(1, 2, 3), keepdims=True)
    hann = np.hanning(HOLE_SIZE)
    window = hann[:, None, None] * hann[None, :, None] * hann[None, None, :]
    return (np.abs(np.fft.fftn(holes * window, axes=(1, 2, 3))) ** 2).mean(0)


def _frequency_index() -> np.ndarray:
    """Integer frequency index (-HOLE_SIZE/2 .. HOLE_SIZE/2 - 1) of each spectrum bin, ``(3, n, n, n)``."""
    k = np.rint(np.fft.fftfreq(HOLE_SIZE) * HOLE_SIZE)
    return np.stack(np.meshgrid(k, k, k, indexing="ij"))


def spectral_background(power: np.ndarray) -> np.ndarray:
    """What `spectral_peak` measures each bin of a `hole_power_spectrum` against: the median of its
    `SPECTRUM_BACKGROUND_BINS`^3 neighbourhood (wrapping, as the spectrum is periodic)."""
    return ndimage.median_filter(power, size=SPECTRUM_BACKGROUND_BINS, mode="wrap")


def spectral_peak_ratio(cubes_hu: np.ndarray) -> float:
    """`spectral_peak`'s ratio."""
    return spectral_peak(cubes_hu)[0]


def spectral_peak(cubes_hu: np.ndarray) -> tuple[float, tuple[int, int, int]]:
    """The sharpest peak of the holes' mean high-pass power spectrum (`hole_power_spectrum`): the
    largest ratio of a bin's power to the median power of its `SPECTRUM_BACKGROUND_BINS`^3 neighbourhood
    (the spectrum is periodic, so the neighbourhood wraps), over the bins at least `SPECTRUM_MIN_RADIUS`
    index units from DC. A periodic pattern (a checkerboard of period 2 or 4 voxels, even of +-10 HU)
    fills a few bins and stands far above its neighbours; noise gives a few units. The median is taken
    locally, not over the whole spectrum, because the spectrum falls steeply with frequency and a global
    ratio mostly measures how much nodule and vessel a hole holds (a generated 15 mm nodule scores far
    above a pristine 4 mm one without any artefact). Returns the ratio and the peak's bin as its frequency index
    (z, y, x) (`_frequency_index`: index k along an axis is a period of ``HOLE_SIZE / |k|`` voxels)."""
    power = hole_power_spectrum(cubes_hu)
    prominence = power / spectral_background(power)
    frequency = _frequency_index()
    prominence[np.sqrt((frequency**2).sum(0)) < SPECTRUM_MIN_RADIUS] = 0.0
    peak = np.unravel_index(np.argmax(prominence), prominence.shape)
    return float(prominence[peak]), tuple(int(k[peak]) for k in frequency)


def nyquist_power_fraction(cubes_hu: np.ndarray) -> float:
    """Share of the holes' mean high-pass power spectrum in the bins at the Nyquist frequency (index
    HOLE_SIZE/2, period 2 voxels) of any axis, where a checkerboard concentrates."""
    power = hole_power_spectrum(cubes_hu)
    at_nyquist = (np.abs(_frequency_index()) == HOLE_SIZE // 2).any(0)
    return float(power[at_nyquist].sum() / power.sum())


def central_nodule_mask(cube_hu: np.ndarray, criteria: QualityCriteria = QualityCriteria()) -> np.ndarray:
    """The nodule at the centre at the vessel threshold: `m3d.tamper.quality.central_component` of the
    voxels > `VESSEL_MIN_HU` (as `measure_nodule`, over the whole cube), dilated back by one voxel within
    the solid voxels (the rim the opening took)."""
    solid = cube_hu > VESSEL_MIN_HU
    nodule = central_component(solid, criteria.center_radius_mm)
    return ndimage.binary_dilation(nodule, ndimage.generate_binary_structure(3, 3)) & solid


def vessel_continuity(cubes_hu: np.ndarray, pristine_hu: np.ndarray) -> float | None:
    """Vessel voxels (> `VESSEL_MIN_HU`) in the hole's shell (the hole minus its central ball of radius
    `SHELL_INNER_RADIUS_MM`, where vessels pass by the nodule), leaving out the central nodule of either
    cube (`central_nodule_mask`), in each generated cube over those in its pristine cube: the mean of
    that ratio over the sites whose pristine shell holds at least `MIN_SHELL_VESSEL_VOXELS` (None if
    none). 1 = as much vessel as before, 0 = the vessels were cut; above 1: spurious bright tissue."""
    shell = hole_mask(cubes_hu.shape[1:]) & (distance_from_centre_mm(cubes_hu.shape[1:]) > SHELL_INNER_RADIUS_MM)
    ratios = []
    for cube, pristine in zip(cubes_hu, pristine_hu):
        region = shell & ~central_nodule_mask(cube) & ~central_nodule_mask(pristine)
        before = int((pristine[region] > VESSEL_MIN_HU).sum())
        if before >= MIN_SHELL_VESSEL_VOXELS:
            ratios.append((cube[region] > VESSEL_MIN_HU).sum() / before)
    return round(float(np.mean(ratios)), 3) if ratios else None


def vessel_faces_continuity(cubes_hu: np.ndarray) -> float | None:
    """Of the vessel voxels (> `VESSEL_MIN_HU`) in the layer just outside each of the hole's six faces
    (over the face's extent), the share whose neighbour just inside the face, or one of that voxel's 8
    neighbours in the same layer (vessels cross faces obliquely), is a vessel voxel too; pooled over
    all cubes and faces (None if there are none). Pristine cubes give nearly 1; a hole that cuts the
    vessels gives 0."""
    solid = np.asarray(cubes_hu) > VESSEL_MIN_HU
    span = np.flatnonzero(hole_mask(solid.shape[1:])[:, solid.shape[2] // 2, solid.shape[3] // 2])
    first, last = int(span[0]), int(span[-1])
    face = slice(first, last + 1)
    crossing = continuing = 0
    for axis in (1, 2, 3):
        size = [1, 3, 3, 3]
        size[axis] = 1
        spread = ndimage.maximum_filter(solid, size=size)  # any vessel among a voxel's 3x3 in-layer neighbours
        for outside, inside in ((first - 1, first), (last + 1, last)):
            out_index, in_index = [slice(None), face, face, face], [slice(None), face, face, face]
            out_index[axis], in_index[axis] = outside, inside
            vessels = solid[tuple(out_index)]
            crossing += int(vessels.sum())
            continuing += int((vessels & spread[tuple(in_index)]).sum())
    return round(continuing / crossing, 3) if crossing else None


def chest_wall_fraction(cube_hu: np.ndarray) -> float:
    """The share of the cube's context (outside the hole, the same before and after tampering) that is chest wall
    (`thick_tissue`)."""
    return float(thick_tissue(cube_hu)[~hole_mask(cube_hu.shape)].mean())


def at_chest_wall(pristine_hu: np.ndarray) -> np.ndarray:
    """Per site, whether it is at the chest wall: `chest_wall_fraction` of its pristine cube >=
    `CHEST_WALL_SITE_FRACTION`."""
    return np.array([chest_wall_fraction(cube) >= CHEST_WALL_SITE_FRACTION for cube in pristine_hu])


def real_nodule_hu_range(real_cubes_hu: np.ndarray) -> tuple[float, float]:
    """The 5th-95th percentile of the mean HU of the real nodules > 10 mm (the injection keep rule) in
    ``real_cubes_hu``: the range a real-looking injected nodule's mean HU lies in."""
    real = [measure_nodule(cube) for cube in real_cubes_hu]
    real_hu = [m.mean_hu for m in real if passes_keep_rule(m.diameter_mm, "inject")]
    return tuple(round(float(v), 1) for v in np.percentile(real_hu, [5, 95]))


def proportion_interval(successes: int, n: int, level: float = 0.95) -> list[float]:
    """The Wilson score ``level`` interval of a fraction ``successes / n`` (rounded to 3 places): with the few sites
    here, one site moves a fraction by 1/n, and the interval says how far the true rate may lie."""
    from scipy.stats import norm

    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1; got {successes} of {n}")
    z = float(norm.ppf(0.5 + level / 2))
    p = successes / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    return [round(float(max(0.0, centre - half)), 3), round(float(min(1.0, centre + half)), 3)]


def real_looking(results: list[QualityResult], hu_range: tuple[float, float]) -> np.ndarray:
    """Per measured nodule: kept by the injection rule and its mean HU within ``hu_range`` (the real nodules')."""
    kept = np.array([result.kept for result in results], bool)
    mean_hu = np.array([result.measurement.mean_hu for result in results], float)
    return kept & (mean_hu >= hu_range[0]) & (mean_hu <= hu_range[1])


def real_looking_by_chest_wall(plausible: np.ndarray, pristine_hu: np.ndarray) -> dict:
    """``plausible`` (real-looking per site) split by whether the site is at the chest wall (`at_chest_wall`)."""
    at_wall = at_chest_wall(pristine_hu)
    return {
        where: {"n": int(sites.sum()), "fraction": round(float(plausible[sites].mean()), 3) if sites.any() else None}
        for where, sites in (("at_chest_wall", at_wall), ("away_from_chest_wall", ~at_wall))
    }


def generate(
    pipe: M3DTamperPipeline, cubes_hu: np.ndarray, seed: int, **options
) -> tuple[np.ndarray, np.ndarray, float]:
    """The pipeline's cubes (HU) for pristine ``cubes_hu``, how much of the pristine cube each of their voxels
    replaces (the output's ``replaced``, as `paste_cube` takes it) and the seconds it took (``options``: call
    arguments such as ``touch_up=False``)."""
    start = time.perf_counter()
    out = pipe(
        cubes=hu_to_unit(cubes_hu)[:, None], generator=torch.Generator().manual_seed(seed), progress=False, **options
    )
    seconds = time.perf_counter() - start
    generated = unit_to_hu(out.cubes[:, 0])
    return np.where(hole_mask(), generated, cubes_hu).astype(np.float32), np.stack(out.replaced), seconds


def measure_draw(
    pipe: M3DTamperPipeline,
    pristine_hu: np.ndarray,
    real_hu: np.ndarray,
    hu_range: tuple[float, float],
    seed: int,
    scans: list | None = None,
    oracle_hu: np.ndarray | None = None,
) -> tuple[np.ndarray, dict, float]:
    """One draw of ``pipe`` at the sites ``pristine_hu`` (generation seed ``seed``: the drawn nodule masks and the
    sampling noise): the generated cubes and their figures (`summarize`, the two-sample test against ``real_hu``;
    with ``oracle_hu``, real nodules pasted into the same sites (`oracle_injections`), the paired test against them,
    ``two_sample_vs_oracle``; for a pipeline whose touch-ups are on by default, the seam without them,
    ``seam_ratio_raw``; with the sites' ``scans``, the same figures of the cubes `in_the_scan` and the tampered scans'
    ``finest_grain``, `pasted_in_the_scan`), and the seconds the generation took."""
    task = pipe.config.task
    generated, replaced, seconds = generate(pipe, pristine_hu, seed=seed)
    figures = {"seed": seed, **summarize(generated, task, hu_range, pristine_hu)}
    two_sample = two_sample_accuracy(generated, real_hu, seed=0)
    figures.update(two_sample_accuracy=two_sample.pop("accuracy"), two_sample=two_sample)
    if oracle_hu is not None:
        figures["two_sample_vs_oracle"] = two_sample_accuracy(generated, oracle_hu, seed=0, paired=True)["accuracy"]
    touch_up = inspect.signature(pipe.__call__).parameters.get("touch_up")
    if touch_up is not None and touch_up.default is not False:  # on by default: the seam without it too
        raw = generate(pipe, pristine_hu, seed=seed, touch_up=False)[0]
        figures["seam_ratio_raw"] = round(float(np.mean([seam_ratio(cube) for cube in raw])), 3)
    if scans is not None:
        recut, grain = pasted_in_the_scan(generated, replaced, scans, task)
        figures["in_the_scan"] = {
            **summarize(recut, task, hu_range, pristine_hu),
            "two_sample_accuracy": two_sample_accuracy(recut, real_hu, seed=0)["accuracy"],
            "finest_grain": grain,
        }
    return generated, figures, seconds


def mean_over_draws(draws: list[dict]) -> dict:
    """The figures of several draws at the same sites as one: numbers (also inside nested dicts, and lists of
    numbers element by element) averaged, counts kept; the `RANGED_FIGURES` also as ``<figure>_range`` (lowest,
    highest draw); what has no meaningful mean (the Wilson intervals, the two-sample folds, the seed) is left to
    ``draws``."""
    mean: dict = {}
    for key, first in draws[0].items():
        values = [draw[key] for draw in draws]
        if key == "seed" or key.endswith("_ci95") or key == "two_sample":
            continue
        if isinstance(first, dict):
            mean[key] = mean_over_draws(values)
        elif first is None or any(value is None for value in values):
            mean[key] = None
        elif isinstance(first, list):
            mean[key] = [round(float(np.mean(column)), 3) for column in zip(*values)]
        elif isinstance(first, int) and len(set(values)) == 1:  # a count, the same in every draw
            mean[key] = first
        else:
            mean[key] = round(float(np.mean(values)), 3)
            if key in RANGED_FIGURES:
                mean[f"{key}_range"] = [min(values), max(values)]
    return mean


def summarize(cubes_hu: np.ndarray, task: str, hu_range: tuple[float, float], pristine_hu: np.ndarray) -> dict:
    """Quality figures of a set of (generated or pristine) cubes for ``task``; ``pristine_hu``: the
    pristine cubes of the same sites (the cubes themselves for the reference)."""
    results = [check_quality(cube, task, pristine_hu=pristine) for cube, pristine in zip(cubes_hu, pristine_hu)]
    diameters = np.array([r.measurement.diameter_mm for r in results])
    mean_hu = np.array([r.measurement.mean_hu for r in results])
    kept = np.array([r.kept for r in results])
    summary = {
        "n": len(results),
        "diameter_mm_median": round(float(np.median(diameters)), 2),
        "diameter_mm_iqr": [round(float(v), 2) for v in np.percentile(diameters, [25, 75])],
        "kept_fraction": round(float(kept.mean()), 3),
        "kept_fraction_ci95": proportion_interval(int(kept.sum()), len(kept)),
        "seam_ratio_mean": round(float(np.mean([seam_ratio(cube) for cube in cubes_hu])), 3),
        "spectral_peak_ratio": round(spectral_peak_ratio(cubes_hu), 2),
        "nyquist_power_fraction": round(nyquist_power_fraction(cubes_hu), 4),
        "vessel_continuity": vessel_continuity(cubes_hu, pristine_hu),
        "vessel_faces_continuity": vessel_faces_continuity(cubes_hu),
    }
    if task == "inject":
        plausible = real_looking(results, hu_range)
        summary["nodule_mean_hu_median"] = (
            round(float(np.nanmedian(mean_hu)), 1) if np.isfinite(mean_hu).any() else None
        )
        summary["real_looking_fraction"] = round(float(plausible.mean()), 3)
        summary["real_looking_fraction_ci95"] = proportion_interval(int(plausible.sum()), len(plausible))
        summary["real_looking_by_site"] = real_looking_by_chest_wall(plausible, pristine_hu)
    return summary


def ceiling_nodules(n_phantoms: int, seed: int, size: int, max_slices: int | None, spacing: str) -> np.ndarray:
    """The pristine cubes of the real nodules > 10 mm (kept by the injection rule) at the removal sites of
    ``n_phantoms`` phantoms of ``seed``: what an injector that made real nodules exactly would draw (none if
    ``n_phantoms`` is 0)."""
    if n_phantoms == 0:
        return np.empty((0,) + (CUBE_SIZE,) * 3, np.float32)
    cubes, _ = held_out_cubes(n_phantoms, seed, size, max_slices, spacing, keep_scans=False)
    kept = np.array([check_quality(cube, "inject").kept for cube in cubes["remove"]], bool)
    return cubes["remove"][kept]


def real_looking_ceiling(real_nodules_hu: np.ndarray, hu_range: tuple[float, float]) -> dict | None:
    """The share of the real nodules ``real_nodules_hu`` (`ceiling_nodules`) whose mean HU lies in ``hu_range``:
    the ``real_looking_fraction`` of a generator that reproduced real nodules exactly (None without nodules)."""
    if not len(real_nodules_hu):
        return None
    inside = real_looking([check_quality(cube, "inject") for cube in real_nodules_hu], hu_range)
    return {
        "n": len(real_nodules_hu),
        "fraction": round(float(inside.mean()), 3),
        "by_site": real_looking_by_chest_wall(inside, real_nodules_hu),
    }


def drawn_per_site(real_hu: np.ndarray, sites: int, seed: int) -> np.ndarray:
    """One of the real cubes ``real_hu`` per site, drawn by ``seed``: each at most once while they last."""
    return real_hu[np.random.default_rng(seed).choice(len(real_hu), sites, replace=len(real_hu) < sites)]


def mean_and_range(name: str, values: list[float], digits: int) -> dict:
    """``values`` of several draws as ``{name: their mean, name_range: [lowest, highest]}``."""
    return {name: round(float(np.mean(values)), digits), f"{name}_range": [min(values), max(values)]}


def oracle_injections(sites_hu: np.ndarray, real_nodules_hu: np.ndarray, seed: int) -> np.ndarray:
    """An exact injector: into the hole of each site's cube, the nodule of a real cube (its `central_nodule_mask`
    within the hole) drawn from ``real_nodules_hu`` by ``seed`` (each at most once while they last); everything
    else is the site's own."""
    hole = hole_mask(sites_hu.shape[1:])
    return np.stack(
        [
            np.where(central_nodule_mask(real) & hole, real, site)
            for site, real in zip(sites_hu, drawn_per_site(real_nodules_hu, len(sites_hu), seed))
        ]
    ).astype(np.float32)


def two_sample_oracle(
    sites_hu: np.ndarray, real_nodules_hu: np.ndarray, reference_hu: np.ndarray, draws: int
) -> dict | None:
    """The two-sample accuracy of `oracle_injections` at ``sites_hu`` against ``reference_hu``, the mean of
    ``draws`` draws (seeds 0, 1, ...: other real nodules per site): what the test gives an injector whose nodules
    are real, so what the injection sites' surroundings alone give away (None without sites or nodules)."""
    if not len(sites_hu) or not len(real_nodules_hu):
        return None
    accuracies = [
        two_sample_accuracy(oracle_injections(sites_hu, real_nodules_hu, seed), reference_hu, seed=0)["accuracy"]
        for seed in range(draws)
    ]
    if None in accuracies:
        return None
    return {**mean_and_range("accuracy", accuracies, 3), "draws": draws, "real_nodules": len(real_nodules_hu)}


def two_sample_oracle_control(sites_hu: np.ndarray, real_nodules_hu: np.ndarray, draws: int) -> dict | None:
    """The control of ``two_sample_vs_oracle``: `oracle_injections` at ``sites_hu`` from two disjoint halves of
    ``real_nodules_hu`` (``draws`` draws: other halves, other nodules per site), told apart by the paired test
    (`two_sample_accuracy` with ``paired=True``). Two sets of real nodules at the same sites: it must come out at
    chance, unless the halves hold too few nodules for the sites and repeat them. None without sites or with
    fewer than two nodules."""
    if not len(sites_hu) or len(real_nodules_hu) < 2:
        return None
    accuracies = []
    for seed in range(draws):
        first, second = halves(real_nodules_hu, seed)
        pair = (oracle_injections(sites_hu, nodules, seed) for nodules in (first, second))
        accuracies.append(two_sample_accuracy(*pair, seed=0, paired=True)["accuracy"])
    return {
        **mean_and_range("accuracy", accuracies, 3),
        "draws": draws,
        "real_nodules_per_half": len(real_nodules_hu) // 2,
    }


def oracle_removals(sites_hu: np.ndarray, real_lung_hu: np.ndarray, seed: int) -> np.ndarray:
    """An exact remover: each site's hole filled with the hole of a real cube of lung around a small benign nodule,
    drawn from ``real_lung_hu`` by ``seed`` (each at most once while they last) and feathered in over the hole's
    faces as the removers' touch-ups blend (`m3d.tamper.touch_up.hole_feather`), without their added noise, which
    real tissue holds already."""
    feather = hole_feather()
    return (feather * drawn_per_site(real_lung_hu, len(sites_hu), seed) + (1 - feather) * sites_hu).astype(np.float32)


def spectral_peak_oracle(sites_hu: np.ndarray, real_lung_hu: np.ndarray, scans: list, draws: int) -> dict | None:
    """`spectral_peak_ratio` of `oracle_removals` at the removal sites ``sites_hu``, in the cube and in the scan
    (`in_the_scan`; ``scans`` as `held_out_cubes` gives them), the mean of ``draws`` draws (seeds 0, 1, ...: other
    real lung per site): what a remover whose fill is real lung scores; with the medians over the draws of the
    tampered scans' `finest_grain_at_site`. The pristine cube is the reference in the
    cube; in the scan it was never pasted, while a fill replaces the scan over the feather, resampled onto the scan's
    slices, and is cut again. None without sites or real lung."""
    if not len(sites_hu) or not len(real_lung_hu):
        return None
    peaks: dict[str, list[float]] = {"cube": [], "in_the_scan": []}
    grain = []
    for seed in range(draws):
        filled = oracle_removals(sites_hu, real_lung_hu, seed)
        peaks["cube"].append(round(spectral_peak_ratio(filled), 2))
        recut, site_grain = pasted_in_the_scan(filled, np.broadcast_to(hole_feather(), filled.shape), scans, "remove")
        peaks["in_the_scan"].append(round(spectral_peak_ratio(recut), 2))
        grain.append(site_grain)
    return {
        **mean_and_range("cube", peaks["cube"], 2),
        **mean_and_range("in_the_scan", peaks["in_the_scan"], 2),
        "finest_grain_in_the_scan": median_of_found(grain),
        "draws": draws,
        "real_lung_cubes": len(real_lung_hu),
    }


def halves(cubes: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two random halves of ``cubes`` (the two-sample control)."""
    first, second = np.array_split(np.random.default_rng(seed).permutation(len(cubes)), 2)
    return cubes[first], cubes[second]


def montage(rows: list[tuple[str, np.ndarray]], path: Path) -> None:
    """Central axial slices: one row per (label, cubes), ``MONTAGE_SITES`` columns, lung window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(rows), MONTAGE_SITES, figsize=(1.6 * MONTAGE_SITES + 1.4, 1.6 * len(rows)), squeeze=False
    )
    low = (32 - 20) // 2 - 0.5
    for r, (label, cubes) in enumerate(rows):
        for c in range(MONTAGE_SITES):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(cubes):
                ax.imshow(cubes[c][16], cmap="gray", vmin=-1000, vmax=400, interpolation="nearest")
                ax.add_patch(plt.Rectangle((low, low), 20, 20, fill=False, lw=0.6, ls=":", color="tab:orange"))
        axes[r, 0].set_ylabel(label, fontsize=8)
    fig.suptitle("held-out phantom sites, central axial slice of the 32 mm cube (dotted: generated hole)", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pipelines", nargs="+", type=Path, default=None, help="pipeline folders (default: the demo folders)"
    )
    parser.add_argument(
        "--phantoms", type=int, default=20, help="held-out phantoms (the committed results: 20, about 34 + 18 sites)"
    )
    parser.add_argument("--seed", type=int, default=2024, help="held-out phantom seed (training used 0)")
    parser.add_argument(
        "--size", type=int, default=DEFAULT_PHANTOMS["size"], help="phantom in-plane matrix (the builder's)"
    )
    parser.add_argument(
        "--max-slices", type=int, default=DEFAULT_PHANTOMS["max_slices"], help="phantom slices (the builder's)"
    )
    parser.add_argument(
        "--phantom-spacing",
        choices=PHANTOM_SPACINGS,
        default=DEFAULT_PHANTOMS["spacing"],
        help="native: the real series' pixel spacing; scaled: the real field of view on --size pixels",
    )
    parser.add_argument(
        "--ceiling-phantoms",
        type=int,
        default=CEILING_PHANTOMS,
        help="phantoms (seed + 1) whose real nodules > 10 mm give real_looking_ceiling (0: skip)",
    )
    parser.add_argument(
        "--draws",
        type=int,
        default=DRAWS,
        help="draws per pipeline (generation seeds 0, 1, ...: masks and sampling noise); figures are their mean",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks" / "results",
        help="folder for demo_pipelines_quality.json and demo_pipelines_montage.png (the committed results' folder)",
    )
    parser.add_argument("--no-montage", action="store_true", help="write the JSON only, not the montage")
    args = parser.parse_args(argv)
    if args.draws < 1 or args.phantoms < 1:
        parser.error(f"--draws and --phantoms must be at least 1; got {args.draws} and {args.phantoms}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out must be a folder (the JSON and the montage go into it); {args.out} is a file")
    torch.manual_seed(0)

    pristine, scans = held_out_cubes(args.phantoms, args.seed, args.size, args.max_slices, args.phantom_spacing)
    hu_range = real_nodule_hu_range(pristine["remove"])
    real_nodules = ceiling_nodules(
        args.ceiling_phantoms, args.seed + 1, args.size, args.max_slices, args.phantom_spacing
    )
    ceiling = real_looking_ceiling(real_nodules, hu_range)
    if ceiling is not None:
        ceiling = {"phantoms": args.ceiling_phantoms, "seed": args.seed + 1, **ceiling}
    real_targets = {"inject": pristine["remove"], "remove": pristine["inject"]}  # real nodules of each task's result
    report: dict = {
        "device": describe_device("cpu"),
        "torch": torch.__version__,
        "held_out": {
            "phantoms": args.phantoms,
            "seed": args.seed,
            "size": args.size,
            "max_slices": args.max_slices,
            "spacing": args.phantom_spacing,
            **PHANTOM_NODULES,
        },
        "draws": args.draws,
        "real_nodule_mean_hu_range": list(hu_range),
        "real_looking_ceiling": ceiling,
        "pristine": {task: summarize(pristine[task], task, hu_range, pristine[task]) for task in TASKS},
        "pristine_finest_grain": {
            task: median_of_found(
                [finest_grain_at_site(case.volume.hu, case, location) for case, location in task_sites(scans, task)]
            )
            for task in TASKS
        },
        "two_sample_control": {
            task: two_sample_accuracy(*halves(pristine[task], args.seed), seed=0) for task in TASKS
        },
        "two_sample_oracle": {
            "inject": two_sample_oracle(pristine["inject"], real_nodules, real_targets["inject"], args.draws)
        },
        "two_sample_oracle_control": {
            "inject": two_sample_oracle_control(pristine["inject"], real_nodules, args.draws)
        },
        "spectral_peak_oracle": {
            "remove": spectral_peak_oracle(pristine["remove"], pristine["inject"], scans, args.draws)
        },
        "pipelines": {},
    }
    references = (
        "pristine",
        "pristine_finest_grain",
        "two_sample_control",
        "two_sample_oracle",
        "two_sample_oracle_control",
        "spectral_peak_oracle",
    )
    print(json.dumps({key: report[key] for key in references}))
    rows = {task: [(f"{task} site: pristine", pristine[task][:MONTAGE_SITES])] for task in TASKS}
    for folder in args.pipelines or demo_folders():
        pipe = load_pipeline(folder)
        task = pipe.config.task
        draws = [
            measure_draw(
                pipe,
                pristine[task],
                real_targets[task],
                hu_range,
                seed,
                scans,
                oracle_injections(pristine[task], real_nodules, seed)
                if task == "inject" and len(real_nodules)
                else None,
            )
            for seed in range(args.draws)
        ]
        cubes, figures, seconds = zip(*draws)
        entry = {
            "folder": str(folder.resolve().relative_to(ROOT) if folder.resolve().is_relative_to(ROOT) else folder),
            "class": type(pipe).__name__,
            "task": task,
            **mean_over_draws(list(figures)),
            "draws": list(figures),
            "cubes_per_s": round(len(pristine[task]) * args.draws / sum(seconds), 2),
            "scan_cubes_per_s": round(scan_cubes_per_s(pipe, scans), 2),
        }
        if "num_inference_steps" in pipe.config:
            entry.update(scheduler=type(pipe.scheduler).__name__, num_inference_steps=pipe.config.num_inference_steps)
        report["pipelines"][folder.name] = entry
        rows[task].append((folder.name, cubes[0][:MONTAGE_SITES]))  # the first draw
        print(json.dumps({folder.name: entry}))

    write_json_atomic(args.out / "demo_pipelines_quality.json", report, trailing_newline=True, sort_keys=False)
    if not args.no_montage:
        montage(rows["inject"] + rows["remove"], args.out / "demo_pipelines_montage.png")
    return report


if __name__ == "__main__":
    main()
