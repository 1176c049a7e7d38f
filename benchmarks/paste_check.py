"""Does a removal leave the removed nodule in the tampered scan? The paste's two rules, side by side.

    .venv/bin/python benchmarks/paste_check.py                 # the evaluation's 20 held-out phantoms
    .venv/bin/python benchmarks/paste_check.py --phantoms 4 --out /tmp/paste_check.json --figure /tmp/paste.png

A 1 mm cube holds a scan of 0.5-0.98 mm pixels and 1.25-3 mm slices only in part: cut from the scan and resampled
back, it misses what lies between its planes and below 1 mm in-plane, the sharp edge of a nodule above all. At the
evaluation's held-out removal sites (`eval_demo_pipelines.held_out_cubes`), the hole of each pristine cube is filled
with flat lung (``FLAT_LUNG_HU``), pasted into its scan (`m3d.tamper.cube.paste_cube`) by three rules, and the 1 mm
cube cut there again:

* ``change_added``: ``replaced`` 0, the change added to the scan's own voxels (the paste until 2026-12-06): what the
  cube did not hold of the removed nodule stays;
* ``replaced``: ``replaced`` 1 over the hole, as the pipelines pasted what they draw from then on: the scan beneath
  the hole is replaced;
* ``replaced_with_grain``: the same with the scan's grain finer than the cube drawn anew (``grain_rng``, seeded by
  the site's number): the noise the replaced lung lacks, in the scan's texture (`paste_cube`), which the pipelines do
  not draw: each version of it tried so far made the demo's fakes easier for Slab3D to localize (README).

Anything but flat lung in the hole comes from the pristine scan or the drawn grain: under every rule, near the
hole's faces, what the resamplings carry in from the context (the same for all); under ``change_added`` also what
the cube did not hold; under ``replaced_with_grain`` also the grain. Per rule, in the hole: ``removed_rim_hu``, the
mean |HU - flat lung| on the removed nodule's rim (the one-voxel shell of the pristine cube's central nodule,
`central_nodule_mask`); ``lung_hu``, the same on the pristine
lung (below ``LUNG_MAX_HU``) 2 voxels or more from the nodule; and ``core_max_hu``, the largest anywhere in the
hole's core (``CORE_MARGIN_VOXELS`` inside its faces, beyond the two resamplings' reach), 0 when nothing of the scan
is left there. ``--figure`` draws the first sites' axial slices through the site, pristine and after each rule, at
the scan's own pixels.

``exact_fills``: the spectral peak (`spectral_peak_ratio`) in the cube and, pasted by each rule, in the scan, of
exact fills, the evaluation's oracles (draw 0): real lung feathered into the removal holes (`oracle_removals`,
replaced by the feather) and real nodules > 10 mm of ``--ceiling-phantoms`` other phantoms in the injection holes
(`oracle_injections`, replaced where they change the cube), beside the pristine cubes' (``pristine_peak``): in the
scan, a generator's peak is to be read against what an exact one gets there. With each, ``finest_grain``
(`finest_grain_at_site`, medians over the sites): the scan's finest in-plane grain at the site against its grain
elsewhere (``ratio``; of its noise alone, ``noise_ratio``) and its texture (``in_plane``, ``through_plane``),
pristine and after each rule: a replaced region holds only what the 1 mm cube holds, and loses the grain of the
scan's finer pixels unless the paste draws it anew.
Results: ``benchmarks/results/paste_check_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from eval_demo_pipelines import (  # noqa: E402  (the script beside this one)
    central_nodule_mask,
    ceiling_nodules,
    finest_grain_at_site,
    held_out_cubes,
    median_of_found,
    oracle_injections,
    oracle_removals,
    pasted_at_site,
    spectral_peak_ratio,
    task_sites,
)

from m3d.dataset_builder.generate import DEFAULT_PHANTOMS  # noqa: E402
from m3d.devices import describe_device  # noqa: E402
from m3d.files import write_json_atomic  # noqa: E402
from m3d.tamper.cube import hole_mask  # noqa: E402
from m3d.tamper.touch_up import hole_feather  # noqa: E402

RULES = ("change_added", "replaced", "replaced_with_grain")
FLAT_LUNG_HU = -850.0
LUNG_MAX_HU = -600.0
CORE_MARGIN_VOXELS = 4  # linear resampling onto slices up to 3 mm apart and back reaches this far
FIGURE_SITES = 3
FIGURE_HALF_WIDTH_MM = 18.0


def pasted(case, location: np.ndarray, filled_hu: np.ndarray, replaced: np.ndarray, rule: str, site_number: int):
    """The site's scan with ``filled_hu`` pasted by ``rule`` (``replaced`` the fill's weights, used by the rules that
    replace; the grain seeded by ``site_number``), and the 1 mm cube cut there again."""
    share = np.zeros_like(filled_hu) if rule == "change_added" else replaced
    grain_rng = np.random.default_rng(site_number) if rule == "replaced_with_grain" else None
    return pasted_at_site(case, location, filled_hu, share, grain_rng)


def exact_fill_peaks(filled_hu: np.ndarray, replaced: np.ndarray, scans: list, task: str) -> dict:
    """`spectral_peak_ratio` of exact fills ``filled_hu`` of ``task``'s sites in the cube and, pasted by each rule
    (``replaced``: their weights), in the scan; and the medians over the sites of `finest_grain_at_site` in the
    pristine scan and after each rule's paste."""
    sites = task_sites(scans, task)
    peaks = {"cube": round(spectral_peak_ratio(filled_hu), 2)}
    grain = {"pristine": median_of_found([finest_grain_at_site(case.volume.hu, case, spot) for case, spot in sites])}
    for rule in RULES:
        tampered, recut = zip(
            *(
                pasted(case, spot, fill, share, rule, number)
                for number, ((case, spot), fill, share) in enumerate(zip(sites, filled_hu, replaced))
            )
        )
        peaks[f"in_the_scan_{rule}"] = round(spectral_peak_ratio(np.stack(recut)), 2)
        grain[rule] = median_of_found(
            [finest_grain_at_site(volume.hu, case, spot) for volume, (case, spot) in zip(tampered, sites)]
        )
    return {**peaks, "finest_grain": grain}


def left_of_the_scan(recut: np.ndarray, pristine: np.ndarray) -> dict:
    """What the cut-again cubes ``recut`` of flat-lung fills hold of their pristine cubes (module docstring); the rim
    over the sites with a central nodule."""
    hole, core = hole_mask(), ndimage.binary_erosion(hole_mask(), iterations=CORE_MARGIN_VOXELS)
    rim, lung, core_max = [], [], 0.0
    for again, cube in zip(recut, pristine):
        left = np.abs(again - FLAT_LUNG_HU)
        nodule = central_nodule_mask(cube)
        lung.append(left[hole & (cube < LUNG_MAX_HU) & ~ndimage.binary_dilation(nodule, iterations=2)].mean())
        core_max = max(core_max, float(left[core].max()))
        if nodule.any():
            rim.append(left[hole & nodule & ~ndimage.binary_erosion(nodule)].mean())
    return {
        "removed_rim_hu": round(float(np.mean(rim)), 1),
        "lung_hu": round(float(np.mean(lung)), 1),
        "core_max_hu": round(core_max, 1),
        "sites_with_a_nodule": len(rim),
    }


def figure(rows: list[tuple[tuple[float, float, float], list[np.ndarray]]], path: Path) -> None:
    """One row per site, ``(scan spacing mm, [pristine slice, slice after each rule])``: the axial slice through it
    at the scan's own pixels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 1 + len(RULES), figsize=(3 * (1 + len(RULES)), 3 * len(rows)), squeeze=False)
    for row, (spacing, slices) in zip(axes, rows):
        for ax, image, title in zip(row, slices, ("pristine", *(f"paste: {rule}" for rule in RULES))):
            ax.imshow(image, cmap="gray", vmin=-1000, vmax=200)
            ax.set_title(f"{title} ({spacing[0]:.2f} mm slices)", fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=70)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__[__doc__.index("\n\n") + 2 :],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--phantoms", type=int, default=20, help="held-out phantoms (the evaluation's: 20)")
    parser.add_argument("--seed", type=int, default=2024, help="held-out phantom seed (the evaluation's: 2024)")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks" / "results" / "paste_check_cpu.json",
        help="the results JSON (default: the committed one)",
    )
    parser.add_argument(
        "--ceiling-phantoms",
        type=int,
        default=160,
        help="phantoms (seed + 1) whose real nodules > 10 mm fill the injection sites exactly (the evaluation's: 160)",
    )
    parser.add_argument("--figure", type=Path, help="also draw the first sites' slices here (a .png)")
    args = parser.parse_args(argv)
    if args.phantoms < 1 or args.ceiling_phantoms < 1:
        parser.error(
            f"--phantoms and --ceiling-phantoms must be at least 1; got {args.phantoms}, {args.ceiling_phantoms}"
        )
    cubes, scans = held_out_cubes(args.phantoms, args.seed)
    if not len(cubes["remove"]) or not len(cubes["inject"]):
        parser.error(f"{args.phantoms} phantoms of seed {args.seed} give no removal or no injection site")
    real_nodules = ceiling_nodules(
        args.ceiling_phantoms, args.seed + 1, *(DEFAULT_PHANTOMS[key] for key in ("size", "max_slices", "spacing"))
    )
    if not len(real_nodules):
        parser.error(f"{args.ceiling_phantoms} phantoms of seed {args.seed + 1} hold no real nodule > 10 mm")
    filled = np.where(hole_mask(), np.float32(FLAT_LUNG_HU), cubes["remove"]).astype(np.float32)
    sites = task_sites(scans, "remove")
    recut: dict[str, list[np.ndarray]] = {rule: [] for rule in RULES}
    rows = []
    for index, ((case, location), fill) in enumerate(zip(sites, filled)):
        slices = [case.volume.hu]
        for rule in RULES:
            tampered, again = pasted(case, location, fill, hole_mask().astype(np.float32), rule, index)
            recut[rule].append(again)
            slices.append(tampered.hu)
        if index < FIGURE_SITES:
            k, i, j = np.rint(case.volume.world_to_voxel(location)).astype(int)
            half = int(FIGURE_HALF_WIDTH_MM / case.volume.spacing_mm[1])
            rows.append((case.volume.spacing_mm, [hu[k, i - half : i + half, j - half : j + half] for hu in slices]))
    report = {
        "device": describe_device("cpu"),
        "torch": torch.__version__,
        "phantoms": args.phantoms,
        "seed": args.seed,
        "removal_sites": len(sites),
        "flat_lung_hu": FLAT_LUNG_HU,
        "core_margin_voxels": CORE_MARGIN_VOXELS,
        "rules": {rule: left_of_the_scan(np.stack(recut[rule]), cubes["remove"]) for rule in RULES},
        "pristine_peak": {task: round(spectral_peak_ratio(cubes[task]), 2) for task in ("inject", "remove")},
    }
    removals = oracle_removals(cubes["remove"], cubes["inject"], seed=0)
    injections = oracle_injections(cubes["inject"], real_nodules, seed=0)
    report["exact_fills"] = {
        "remove": exact_fill_peaks(removals, np.broadcast_to(hole_feather(), removals.shape), scans, "remove"),
        "inject": exact_fill_peaks(injections, (injections != cubes["inject"]).astype(np.float32), scans, "inject"),
        "real_nodules": len(real_nodules),
    }
    write_json_atomic(args.out, report, trailing_newline=True, sort_keys=False)
    if args.figure is not None:
        figure(rows, args.figure)
    print(json.dumps({key: report[key] for key in ("rules", "pristine_peak", "exact_fills")}, indent=2))
    return report


if __name__ == "__main__":
    main()
