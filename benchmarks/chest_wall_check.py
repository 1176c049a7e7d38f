"""Is it the generator or the measurement? The shipped injectors' nodules at held-out sites at the chest wall,
measured whole (as the evaluation and the builder did up to 2026-12-04) and with the site's chest wall left out (as
they do now: `m3d.tamper.quality.check_quality` with the pristine cube).

    .venv/bin/python benchmarks/chest_wall_check.py              # the three shipped injectors, 20 phantoms

At a site at the chest wall (`eval_demo_pipelines.chest_wall_fraction` >= 0.3) the grown nodule touches the wall,
and the component above -400 HU that reaches the centre (`m3d.tamper.quality.measure_nodule`) takes in wall and
bone. Here the chest wall of the *pristine* cube (`m3d.tamper.quality.chest_wall`: tissue above -300 HU thicker
than a 3 mm ball that reaches the cube's faces, grown by one voxel) is left out of the measurement, and the nodule
counts as real-looking by the same rule (> 10 mm, mean HU within the real nodules' range of the evaluation). A small
benign nodule merged with the wall in the pristine cube is left out with it.

Writes ``benchmarks/results/chest_wall_check_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from eval_demo_pipelines import (  # the script beside this one (its folder is on sys.path)
    DEMO_DIR,
    at_chest_wall,
    generate,
    held_out_cubes,
    real_looking,
    real_nodule_hu_range,
)
from m3d.devices import describe_device
from m3d.files import write_json_atomic
from m3d.pipelines import load_pipeline
from m3d.tamper.quality import check_quality, chest_wall

ROOT = Path(__file__).resolve().parents[1]
INJECTORS = ("pix2pix-inject", "cyclegan-inject", "ddpm-inject")


@dataclass
class HeldOutSites:
    """What the diagnostics start from: their arguments (held-out phantoms as the evaluation's, ``--out``), the
    pristine cubes of the held-out sites, which injection sites are at the chest wall and each one's `chest_wall`,
    and the report's header."""

    args: argparse.Namespace
    pristine: dict[str, np.ndarray]
    at_wall: np.ndarray
    walls: list[np.ndarray]
    report: dict

    def write(self, report: dict) -> dict:
        """Write ``report`` to ``--out`` (as JSON) and return it."""
        write_json_atomic(self.args.out, report, sort_keys=False, trailing_newline=True)
        return report


def held_out_sites(description: str, default_out: Path, argv: list[str] | None) -> HeldOutSites:
    """Parse a diagnostic's arguments and cut its held-out sites (``description``: its docstring)."""
    parser = argparse.ArgumentParser(description=description.split("\n\n")[0])
    parser.add_argument("--phantoms", type=int, default=20, help="held-out phantoms (as the evaluation)")
    parser.add_argument("--seed", type=int, default=2024, help="held-out phantom seed (as the evaluation)")
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    pristine, _ = held_out_cubes(args.phantoms, args.seed, keep_scans=False)
    sites = pristine["inject"]
    at_wall = at_chest_wall(sites)
    report = {
        "what": description.split("\n\n")[0].replace("\n", " "),
        "device": describe_device("cpu"),
        "held_out": {"phantoms": args.phantoms, "seed": args.seed},
        "sites": {"n": len(sites), "at_chest_wall": int(at_wall.sum())},
    }
    return HeldOutSites(args, pristine, at_wall, [chest_wall(cube) for cube in sites], report)


def main(argv: list[str] | None = None) -> dict:
    held_out = held_out_sites(__doc__, ROOT / "benchmarks" / "results" / "chest_wall_check_cpu.json", argv)
    sites, at_wall = held_out.pristine["inject"], held_out.at_wall
    hu_range = real_nodule_hu_range(held_out.pristine["remove"])
    report = {**held_out.report, "real_nodule_mean_hu_range": list(hu_range), "pipelines": {}}
    for name in INJECTORS:
        generated = generate(load_pipeline(DEMO_DIR / name), sites, seed=0)[0]
        as_measured = real_looking([check_quality(cube, "inject") for cube in generated], hu_range)
        wall_left_out = real_looking(
            [check_quality(cube, "inject", pristine_hu=pristine) for cube, pristine in zip(generated, sites)], hu_range
        )
        report["pipelines"][name] = {
            "at_chest_wall": {
                "real_looking_as_measured": round(float(as_measured[at_wall].mean()), 3),
                "real_looking_wall_left_out": round(float(wall_left_out[at_wall].mean()), 3),
            },
            "away_from_chest_wall": {
                "real_looking_as_measured": round(float(as_measured[~at_wall].mean()), 3),
                "real_looking_wall_left_out": round(float(wall_left_out[~at_wall].mean()), 3),
            },
        }
        print(json.dumps({name: report["pipelines"][name]}), flush=True)
    return held_out.write(report)


if __name__ == "__main__":
    main()
