"""What the M3Dsynth builder generates: scan jobs (a scan, its sites and split) from phantom scans or a
LIDC-IDRI download, the tampering pipelines they need, and the examples of one scan in the `FEATURES`
schema (the pristine scan of each site, then one tampered scan per generator that passes the quality
check of `m3d.tamper.quality`)."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from ..data.ct import CTVolume
from ..tamper.plan import OFFICIAL_SPLIT_PATIENTS, OFFICIAL_TASK, Site, plan_sites
from ..tamper.quality import QualityCriteria, check_quality

logger = logging.getLogger(__name__)


def _demo_pipelines_dir() -> Path:
    """The shipped demo pipeline folders in `m3d.pipelines` (``pipelines/demo/`` of the repository), found
    without importing the pipelines (torch, diffusers)."""
    spec = importlib.util.find_spec("m3d.pipelines")
    return Path(next(iter(spec.submodule_search_locations))).resolve() / "demo"


DEMO_PIPELINES_DIR = _demo_pipelines_dir()  # <generator>-<task>/
NIFTI_GZIP_LEVEL = 1  # noise-filled CT barely compresses: level 6 saves 2 % of the bytes at 3x the time
PLAN_SPLITS = {"train": "train", "val": "validation", "test": "test"}  # m3d.tamper.plan -> FEATURES splits
# Phantoms at the real LIDC series' pixel spacing (0.46-0.98 mm) and slice spacing, a 320-pixel field of
# view and a 48-slice slab through the lungs: where a generator's traces are (they vanish at 2-4 mm).
DEFAULT_PHANTOMS = dict(n=8, size=320, max_slices=48, spacing="native")
PHANTOM_SPACINGS = ("native", "scaled")  # scaled: the real field of view on `size` pixels (coarser pixels)
PHANTOM_NODULES = dict(n_nodules=(4, 7), min_diameter_mm=3.0)  # small and large nodules: both tasks get sites


@dataclass
class SiteJob:
    """One site of a scan: ``site_id`` (``inj00012`` / ``rem00003``, the plan's numbering), the plan's
    `Site` whose ``center_zyx`` indexes the annotation source's slices (ordered as ``z_positions_mm`` of
    the `ScanJob`), and an optional fixed test-crop centre in the same index space."""

    site_id: str
    site: Site
    test_crop_zyx: tuple[float, float, float] | None = None


@dataclass
class ScanJob:
    """A scan to tamper: its identity, split, sites, and how to load its volume (``load()``).

    ``z_positions_mm``: the slice z (mm) of the annotation source's slice ``k`` (any order), used to
    place site indices on the loaded volume; None when the sites already index the volume."""

    patient_id: str
    series_instance_uid: str
    split: str
    sites: list[SiteJob]
    load: Callable[[], CTVolume] = field(repr=False)
    z_positions_mm: np.ndarray | None = field(default=None, repr=False)


@dataclass
class Outcome:
    """What happened to one (site, generator): ``status`` is "kept", "dropped" (quality check) or
    "skipped" (the site cannot be tampered); ``reason`` says why."""

    img_id: str
    generator: str
    task: str
    status: str
    reason: str = ""


def number_sites(sites: Sequence[Site]) -> list[str]:
    """The site ids of a plan in its order: ``<inj|rem><index:05d>`` as `write_plan_csv` numbers them."""
    return [f"{OFFICIAL_TASK[site.task]}{number:05d}" for number, site in enumerate(sites)]


def jobs_from_sites(
    sites: Sequence[Site], site_ids: Sequence[str], load: Callable[[str], Callable[[], CTVolume] | None], **job_kwargs
) -> list[ScanJob]:
    """Group sites by series into `ScanJob` objects (plan order); ``load(series_uid)`` gives the loader of
    a series, or None if the scan is not available (its sites are left out, with a log line)."""
    by_series: dict[str, list[SiteJob]] = {}
    for site_id, site in zip(site_ids, sites):
        by_series.setdefault(site.series_instance_uid, []).append(SiteJob(site_id, site))
    jobs = []
    for series_uid, site_jobs in by_series.items():
        loader = load(series_uid)
        if loader is None:
            logger.info("series %s is not available: its %d site(s) are left out", series_uid, len(site_jobs))
            continue
        first = site_jobs[0].site
        jobs.append(
            ScanJob(
                first.patient_id,
                series_uid,
                PLAN_SPLITS.get(first.split, first.split),
                site_jobs,
                loader,
                **job_kwargs,
            )
        )
    return jobs


def phantom_jobs(
    n: int,
    *,
    seed: int = 0,
    size: int = DEFAULT_PHANTOMS["size"],
    max_slices: int | None = DEFAULT_PHANTOMS["max_slices"],
    spacing: str = DEFAULT_PHANTOMS["spacing"],
    split_proportions: Mapping[str, int] = OFFICIAL_SPLIT_PATIENTS,
    workers: int = 1,
    progress: bool = True,
) -> list[ScanJob]:
    """``n`` synthetic scans (`make_phantom`, case ``i`` seeded ``SeedSequence([seed, i])``, patient
    ``M3D-PHANTOM-<i>``) planned with `m3d.tamper.plan` and split by patient with ``seed``. ``spacing``
    "native": the real series' pixel spacing on a ``size``-pixel field of view; "scaled": the real field
    of view on ``size`` pixels. ``split_proportions``: train / val / test patients (`split_patients`);
    ``workers``: processes making the scans."""
    from tqdm.auto import tqdm

    if n < 1:
        raise ValueError(f"the number of phantom scans must be positive; got {n}")
    if spacing not in PHANTOM_SPACINGS:
        raise ValueError(f"phantom spacing must be one of {PHANTOM_SPACINGS}; got {spacing!r}")
    from ..data.phantom import make_phantoms

    settings = dict(size=size, max_slices=max_slices, native_spacing=spacing == "native", **PHANTOM_NODULES)
    made = make_phantoms(n, seed, workers=workers, **settings)
    cases = list(tqdm(made, total=n, desc="phantom scans", unit="scan", disable=not progress))
    sites = plan_sites([case.lidc for case in cases], seed=seed, proportions=split_proportions)
    volumes = {case.lidc.series_instance_uid: case.volume for case in cases}
    return jobs_from_sites(sites, number_sites(sites), lambda uid: lambda: volumes[uid])


def lidc_jobs(root: str | Path, *, seed: int = 0, scans: Iterable[Any] | None = None) -> list[ScanJob]:
    """Jobs for a LIDC-IDRI download: the plan over the annotation database (``scans``, default
    `LIDCDatabase().scans()`, the same plan as ``m3d plan``), restricted to the series found under
    ``root`` (`m3d.data.lidc_discovery.lidc_series`: DICOM folders with their LIDC XML)."""
    import warnings

    from ..data.dicom import read_dicom_series
    from ..data.lidc_discovery import lidc_series

    if scans is None:
        from ..data.lidc import LIDCDatabase

        scans = LIDCDatabase().scans()
    scans = list(scans)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # grouping notes: see `m3d lidc summary`
        sites = plan_sites(scans, seed=seed)
    folders = {uid: folder for folder, _, uid in lidc_series(root)}
    z_positions = {scan.series_instance_uid: np.asarray(scan.z_positions_mm, float) for scan in scans}

    def load(uid: str):
        folder = folders.get(uid)
        return None if folder is None else (lambda: read_dicom_series(folder, uid))

    jobs = jobs_from_sites(sites, number_sites(sites), load)
    for job in jobs:
        job.z_positions_mm = z_positions[job.series_instance_uid]
    if not jobs:
        raise FileNotFoundError(f"none of the planned LIDC-IDRI series is under {root}")
    return jobs


def pipeline_folder(pipelines_dir: str | Path, generator: str, task: str) -> Path:
    return Path(pipelines_dir) / f"{generator}-{task}"


def check_pipelines(pipelines_dir: str | Path | None, generators: Sequence[str], tasks: Sequence[str]) -> Path:
    """The folder of saved pipelines (default `DEMO_PIPELINES_DIR`) once every ``<generator>-<task>/``
    needed is there; a FileNotFoundError that says how to make the missing ones otherwise."""
    root = Path(pipelines_dir) if pipelines_dir is not None else DEMO_PIPELINES_DIR
    missing = [
        str(pipeline_folder(root, g, t))
        for g in generators
        for t in tasks
        if not (pipeline_folder(root, g, t) / "model_index.json").is_file()
    ]
    if missing:
        raise FileNotFoundError(
            f"no saved pipeline in {', '.join(missing)}: train them with `m3d train-generator --model <generator> "
            "--task <task>` and pass --pipelines DIR holding <generator>-<task>/ folders "
            "(pix2pix|cyclegan|ddpm x inject|remove)"
        )
    return root


def load_pipelines(
    pipelines_dir: str | Path | None, generators: Sequence[str], tasks: Sequence[str], device: str | None = None
) -> dict[tuple[str, str], Any]:
    """The saved pipelines ``<pipelines_dir>/<generator>-<task>/`` (default `DEMO_PIPELINES_DIR`, the
    shipped phantom-trained demo pipelines), moved to ``device``."""
    from ..pipelines import load_pipeline

    root = check_pipelines(pipelines_dir, generators, tasks)
    pipelines = {}
    for generator in generators:
        for task in tasks:
            pipeline = load_pipeline(pipeline_folder(root, generator, task))
            if pipeline.task != task:
                raise ValueError(
                    f"{pipeline_folder(root, generator, task)} holds a {pipeline.task!r} pipeline, not {task!r}"
                )
            pipelines[generator, task] = pipeline.to(device) if device else pipeline
    return pipelines


def sample_seed(seed: int, img_id: str) -> int:
    """The generation seed of one sample: depends only on the build seed and the sample id, so a
    sample is the same whichever process, shard or resume makes it."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{img_id}".encode()).digest()[:8], "little") >> 1


def nifti_bytes(image) -> bytes:
    """gzip-compressed NIfTI bytes of a nibabel image, reproducible (no time stamp in the gzip header)."""
    return gzip.compress(image.to_bytes(), compresslevel=NIFTI_GZIP_LEVEL, mtime=0)


def site_voxel(volume: CTVolume, center_zyx: Sequence[float], z_positions_mm: np.ndarray | None) -> np.ndarray:
    """A site index of the annotation source -> the voxel ``(z, y, x)`` of ``volume`` (float): the slice
    through the site's z (mm), the same row and column."""
    center = np.asarray(center_zyx, float)
    if z_positions_mm is None:
        return center
    z_mm = np.interp(center[0], np.arange(len(z_positions_mm)), z_positions_mm)
    first, second = (
        volume.voxel_to_world((0.0, center[1], center[2])),
        volume.voxel_to_world((1.0, center[1], center[2])),
    )
    return np.array([(z_mm - first[2]) / (second[2] - first[2]), center[1], center[2]])


def _optional(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def make_example(
    job: ScanJob,
    site_job: SiteJob,
    generator: str,
    volume: CTVolume,
    mask: np.ndarray,
    *,
    diameter_mm: float | None,
    pristine: CTVolume | None = None,
) -> dict[str, Any]:
    """One example in the `FEATURES` schema (``generator`` "real": the pristine scan, ``mask`` empty).
    A fake given its site's ``pristine`` scan is stored as the box it changed over that example."""
    from ..data.nifti import mask_nifti_image, nifti_image
    from .features import box_fields, changed_box

    site = site_job.site
    voxel = site_voxel(volume, site.center_zyx, job.z_positions_mm)
    crop = voxel if site_job.test_crop_zyx is None else site_voxel(volume, site_job.test_crop_zyx, job.z_positions_mm)
    img_id = f"{site_job.site_id}_{generator}"
    placement = box_fields((0, 0, 0), volume.shape, None)
    stored, stored_mask = volume, mask
    if generator != "real" and pristine is not None:
        start, stop = changed_box(pristine, volume, mask)
        stored = volume.region(start, stop)
        stored_mask = mask[tuple(slice(a, b) for a, b in zip(start, stop))]
        placement = box_fields(start, volume.shape, f"{site_job.site_id}_real")
    return {
        "img_id": img_id,
        "site_id": site_job.site_id,
        "volume": {"bytes": nifti_bytes(nifti_image(stored)), "path": f"{img_id}.nii.gz"},
        "mask": {"bytes": nifti_bytes(mask_nifti_image(stored_mask, stored)), "path": f"{img_id}_mask.nii.gz"},
        **placement,
        "label": "pristine" if generator == "real" else "fake",
        "task": site.task,
        "generator": generator,
        "patient_id": job.patient_id,
        "series_instance_uid": job.series_instance_uid,
        "site_voxel_zyx": [int(v) for v in np.rint(voxel)],
        "site_lps_mm": [float(v) for v in volume.voxel_to_world(voxel)],
        "test_crop_center_zyx": [int(v) for v in np.rint(crop)],
        "spacing_mm": [float(s) for s in volume.spacing_mm],
        "nodule_diameter_mm": _optional(diameter_mm),
        "malignancy_before": _optional(site.malignancy),
        "malignancy_after": None,
    }


def scan_examples(
    job: ScanJob,
    volume: CTVolume,
    *,
    generators: Sequence[str],
    tasks: Sequence[str],
    pipelines: Mapping[tuple[str, str], Any],
    seed: int = 0,
    quality: QualityCriteria | None = QualityCriteria(),
    num_inference_steps: int | None = None,
    cad_model: Any | None = None,
) -> Iterator[tuple[dict[str, Any] | None, Outcome]]:
    """The examples of one scan, in site order: per site of a selected task, the pristine scan, then one
    tampered scan per generator whose result passes ``quality`` (None: keep all), measured on the cube cut again
    from the tampered scan as saved, which also gives an injection's ``nodule_diameter_mm``. Yields ``(example or
    None, outcome)`` per (site, generator). ``num_inference_steps`` goes to the diffusion pipelines (the GANs
    take none; None: each pipeline's own default). With ``cad_model`` (a loaded `m3d.cad` scorer) every example's
    ``malignancy_after`` is the scorer's rating (1-5) at the site of that scan, tampered or not."""
    import torch

    from ..cad.scoring import score_locations
    from ..pipelines import M3DInpaintPipeline
    from ..tamper.cube import TamperLocationError, check_location, extract_cube

    def scored(example: dict[str, Any], scan: CTVolume) -> dict[str, Any]:
        if cad_model is not None:
            example["malignancy_after"] = score_locations(cad_model, scan, [location])[0].rating
        return example

    for site_job in job.sites:
        task = site_job.site.task
        if task not in tasks:
            continue
        voxel = site_voxel(volume, site_job.site.center_zyx, job.z_positions_mm)
        location = volume.voxel_to_world(voxel)
        try:
            check_location(volume, location, allow_outside_lung=True)
        except TamperLocationError as error:
            for generator in ("real", *generators):
                yield None, Outcome(f"{site_job.site_id}_{generator}", generator, task, "skipped", str(error))
            continue
        # the site's chest wall, which the check leaves out of an injected nodule
        pristine_hu = extract_cube(volume, location, allow_outside_lung=True).hu if task == "inject" else None
        empty = np.zeros(volume.shape, bool)
        real = scored(
            make_example(job, site_job, "real", volume, empty, diameter_mm=site_job.site.diameter_mm), volume
        )
        yield real, Outcome(real["img_id"], "real", task, "kept")
        for generator in generators:
            img_id = f"{site_job.site_id}_{generator}"
            pipeline = pipelines[generator, task]
            sampling = isinstance(pipeline, M3DInpaintPipeline) and num_inference_steps is not None
            steps = {"num_inference_steps": num_inference_steps} if sampling else {}
            out = pipeline(
                volume=volume,
                locations_lps_mm=[location],
                generator=torch.Generator().manual_seed(sample_seed(seed, img_id)),
                output_type="volume",
                progress=False,
                allow_outside_lung=True,
                **steps,
            )
            tampered, mask = out.volumes[0], out.masks[0]
            # what the saved scan holds: pasting resamples the 1 mm cube onto the scan's pixels and slices,
            # which can shrink an injected nodule or grow a remaining one, so the cube is cut again there
            saved_hu = extract_cube(tampered, location, allow_outside_lung=True).hu
            verdict = check_quality(saved_hu, task, quality or QualityCriteria(), pristine_hu=pristine_hu)
            if quality is not None and not verdict.kept:
                yield None, Outcome(img_id, generator, task, "dropped", verdict.reason)
                continue
            diameter = verdict.measurement.diameter_mm if task == "inject" else site_job.site.diameter_mm
            example = scored(
                make_example(job, site_job, generator, tampered, mask, diameter_mm=diameter, pristine=volume), tampered
            )
            yield example, Outcome(img_id, generator, task, "kept")
