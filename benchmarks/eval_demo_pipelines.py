"""How real do the shipped demo pipelines' nodules look? Measured on held-out phantom sites.

    .venv/bin/python benchmarks/eval_demo_pipelines.py                  # the six m3d/pipelines/demo folders
    .venv/bin/python benchmarks/eval_demo_pipelines.py --pipelines runs/p2p/pipeline --no-montage

Held-out scans: ``--phantoms`` synthetic chest CTs made with `make_phantom` from ``SeedSequence([seed,
i])`` (default seed 2024; the demo pipelines were trained on seed 0, so the anatomy, the noise and the
sites differ; the nodule *contours* are drawn from the same LIDC database). Sites as the dataset plan
(`m3d.tamper.plan.plan_scan`): injections at small benign nodules (< 8 mm), removals at real nodules
>= 8 mm with malignancy >= 3; sites whose cube leaves the scan or the lungs are skipped.

Per pipeline, on the generated 32^3 cube (1 mm; the hole generated, the rest the scan's own voxels):

* the nodule at the centre, measured by `m3d.tamper.quality.measure_nodule` (component above -400 HU
  reaching the centre): injections count as *real-looking* when it is > 10 mm (the builder's keep
  rule) **and** its mean HU lies in the range of real nodules > 10 mm measured the same way on the
  same held-out scans (5th-95th percentile); removals count when what is left is < 8 mm;
* the seam: mean |HU difference| of neighbouring voxels across the hole's faces divided by the same
  mean over all other neighbouring pairs of the cube (1 = no seam; the pristine cubes give the
  reference value);
* speed: cubes/s of the generator on the batch of all sites (``cubes_per_s``) and of full generation
  on whole scans, scan by scan: cut, fill, paste back (``scan_cubes_per_s``).

Writes ``benchmarks/results/demo_pipelines_quality.json`` (device named) and, unless
``--no-montage``, ``benchmarks/results/demo_pipelines_montage.png`` (central axial slice of four sites
per task: the pristine cube, then each generator).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from m3d.data.phantom import make_phantom
from m3d.pipelines import M3DTamperPipeline, load_pipeline
from m3d.tamper.cube import TamperLocationError, extract_cube, hole_mask, hu_to_unit, unit_to_hu
from m3d.tamper.plan import plan_scan
from m3d.tamper.quality import QualityCriteria, check_quality, measure_nodule

ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = ROOT / "m3d" / "pipelines" / "demo"
GENERATORS = ("pix2pix", "cyclegan", "ddpm")
TASKS = ("inject", "remove")
MONTAGE_SITES = 4


def demo_folders() -> list[Path]:
    """The shipped demo pipeline folders, ``<generator>-<task>``, in a fixed order."""
    return [DEMO_DIR / f"{generator}-{task}" for task in TASKS for generator in GENERATORS]


def held_out_cubes(n_phantoms: int, seed: int, size: int, max_slices: int) -> tuple[dict[str, np.ndarray], list]:
    """Pristine 32^3 HU cubes at the plan's injection and removal sites of ``n_phantoms`` new phantoms,
    and the scans as ``(case, {task: [LPS locations]})``."""
    cubes: dict[str, list[np.ndarray]] = {task: [] for task in TASKS}
    scans = []
    for i in range(n_phantoms):
        case = make_phantom(
            np.random.SeedSequence([seed, i]), size=size, max_slices=max_slices, n_nodules=(3, 6), min_diameter_mm=3.0
        )
        locations: dict[str, list[np.ndarray]] = {task: [] for task in TASKS}
        for site in plan_scan(case.lidc):
            location = case.volume.voxel_to_world(site.center_zyx)
            try:
                cubes[site.task].append(extract_cube(case.volume, location, lung_mask=case.lung_mask).hu)
            except TamperLocationError:
                continue
            locations[site.task].append(location)
        scans.append((case, locations))
    return {task: np.stack(found) for task, found in cubes.items()}, scans


def scan_cubes_per_s(pipe: M3DTamperPipeline, scans: list) -> float:
    """Cubes/s of full generation on whole scans: cut, fill (a batch per scan) and paste back."""
    count, start = 0, time.perf_counter()
    for case, locations in scans:
        if locations[pipe.config.task]:
            pipe(volume=case.volume, locations_lps_mm=locations[pipe.config.task], lung_mask=case.lung_mask,
                 output_type="volume", generator=torch.Generator().manual_seed(0), progress=False)
            count += len(locations[pipe.config.task])
    return count / (time.perf_counter() - start)


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


def generate(pipe: M3DTamperPipeline, cubes_hu: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
    """The pipeline's cubes (HU) for pristine ``cubes_hu`` and the seconds it took."""
    start = time.perf_counter()
    out = pipe(cubes=hu_to_unit(cubes_hu)[:, None], generator=torch.Generator().manual_seed(seed), progress=False)
    seconds = time.perf_counter() - start
    generated = unit_to_hu(out.cubes[:, 0])
    return np.where(hole_mask(), generated, cubes_hu).astype(np.float32), seconds


def summarize(cubes_hu: np.ndarray, task: str, hu_range: tuple[float, float]) -> dict:
    """Quality figures of a set of (generated or pristine) cubes for ``task``."""
    results = [check_quality(cube, task) for cube in cubes_hu]
    diameters = np.array([r.measurement.diameter_mm for r in results])
    mean_hu = np.array([r.measurement.mean_hu for r in results])
    kept = np.array([r.kept for r in results])
    summary = {
        "n": len(results),
        "diameter_mm_median": round(float(np.median(diameters)), 2),
        "diameter_mm_iqr": [round(float(v), 2) for v in np.percentile(diameters, [25, 75])],
        "kept_fraction": round(float(kept.mean()), 3),
        "seam_ratio_mean": round(float(np.mean([seam_ratio(cube) for cube in cubes_hu])), 3),
    }
    if task == "inject":
        plausible = kept & (mean_hu >= hu_range[0]) & (mean_hu <= hu_range[1])
        summary["nodule_mean_hu_median"] = round(float(np.nanmedian(mean_hu)), 1) if np.isfinite(mean_hu).any() else None
        summary["real_looking_fraction"] = round(float(plausible.mean()), 3)
    return summary


def montage(rows: list[tuple[str, np.ndarray]], path: Path) -> None:
    """Central axial slices: one row per (label, cubes), ``MONTAGE_SITES`` columns, lung window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), MONTAGE_SITES, figsize=(1.6 * MONTAGE_SITES + 1.4, 1.6 * len(rows)), squeeze=False)
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
    parser.add_argument("--pipelines", nargs="+", type=Path, default=None, help="pipeline folders (default: the demo folders)")
    parser.add_argument("--phantoms", type=int, default=12, help="held-out phantoms")
    parser.add_argument("--seed", type=int, default=2024, help="held-out phantom seed (training used 0)")
    parser.add_argument("--size", type=int, default=256, help="phantom matrix (the demo's)")
    parser.add_argument("--max-slices", type=int, default=96, help="phantom slices (the demo's)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--no-montage", action="store_true")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    pristine, scans = held_out_cubes(args.phantoms, args.seed, args.size, args.max_slices)
    real = [measure_nodule(cube) for cube in pristine["remove"]]
    real_hu = [m.mean_hu for m in real if m.diameter_mm > QualityCriteria().inject_min_diameter_mm]
    hu_range = tuple(round(float(v), 1) for v in np.percentile(real_hu, [5, 95]))
    report: dict = {
        "device": f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "held_out": {"phantoms": args.phantoms, "seed": args.seed, "size": args.size, "max_slices": args.max_slices},
        "real_nodule_mean_hu_range": list(hu_range),
        "pristine": {task: summarize(pristine[task], task, hu_range) for task in TASKS},
        "pipelines": {},
    }
    rows = {task: [(f"{task} site: pristine", pristine[task][:MONTAGE_SITES])] for task in TASKS}
    for folder in args.pipelines or demo_folders():
        pipe = load_pipeline(folder)
        task = pipe.config.task
        generated, seconds = generate(pipe, pristine[task], seed=0)
        entry = {"folder": str(folder.relative_to(ROOT) if folder.resolve().is_relative_to(ROOT) else folder),
                 "class": type(pipe).__name__, "task": task, **summarize(generated, task, hu_range),
                 "cubes_per_s": round(len(generated) / seconds, 2), "scan_cubes_per_s": round(scan_cubes_per_s(pipe, scans), 2)}
        if "num_inference_steps" in pipe.config:
            entry.update(scheduler=type(pipe.scheduler).__name__, num_inference_steps=pipe.config.num_inference_steps)
        report["pipelines"][folder.name] = entry
        rows[task].append((folder.name, generated[:MONTAGE_SITES]))
        print(json.dumps({folder.name: entry}))

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo_pipelines_quality.json").write_text(json.dumps(report, indent=2) + "\n")
    if not args.no_montage:
        montage(rows["inject"] + rows["remove"], args.out / "demo_pipelines_montage.png")
    return report


if __name__ == "__main__":
    main()
