"""How far the generator evaluation's yardsticks move on real cubes alone, from one set of sites to another.

    .venv/bin/python benchmarks/pristine_spread.py                 # 10 sets of 20 phantoms, seeds 3000-3009
    .venv/bin/python benchmarks/pristine_spread.py --sets 3 --phantoms 4

`eval_demo_pipelines.py` compares each pipeline with real cubes of one set of held-out phantoms (20 of seed
2024: 34 injection and 18 removal sites). Figures of so few sites are draws themselves; this measures how much
by cutting the same cubes (`held_out_cubes`, the same phantom settings) from ``--sets`` independent sets of
``--phantoms`` phantoms (seeds ``--seed``, ``--seed`` + 1, ...; none used by the evaluation or the training)
and measuring, per set and task:

* ``spectral_peak_ratio`` and ``spectral_peak_bin`` (`eval_demo_pipelines.spectral_peak`; the bin as the
  frequency index (z, y, x), ``HOLE_SIZE / |k|`` voxels per period) of the pristine cubes at the task's sites:
  the spread of the reference the evaluation measures each pipeline's peak against;
* ``two_sample_accuracy`` of the set's *real* cubes of the class the task should produce (an injection: the
  real nodules at its removal sites; a removal: its injection sites) against the evaluation's reference cubes
  of that class (seed ``--reference-seed``), with the evaluation's test: what a generator that reproduced real
  cubes of the class exactly would score, the floor of the pipelines' two-sample figures;

and gives each figure's values, median and range over the sets in ``benchmarks/results/pristine_spread_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from m3d.constants import TASKS
from m3d.devices import describe_device
from m3d.files import write_json_atomic

from eval_demo_pipelines import ROOT, held_out_cubes, spectral_peak  # this folder is on sys.path as a script
from two_sample_test import two_sample_accuracy

SETS = 10
SEED = 3000  # training used 0, the evaluation 2024 and 2025, the generator validation 5000
REAL_CLASS_SITES = {"inject": "remove", "remove": "inject"}  # whose real cubes each task's result should resemble


def set_figures(cubes: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict:
    """Per task: the spectral peak (ratio, bin) of the task's site cubes, and the two-sample accuracy of the real
    cubes of the class the task produces against the ``reference`` set's."""
    figures = {}
    for task in TASKS:
        ratio, peak_bin = spectral_peak(cubes[task]) if len(cubes[task]) else (None, None)
        real = REAL_CLASS_SITES[task]
        figures[task] = {
            "sites": len(cubes[task]),
            "spectral_peak_ratio": None if ratio is None else round(ratio, 2),
            "spectral_peak_bin": None if peak_bin is None else list(peak_bin),
            "two_sample_accuracy": two_sample_accuracy(cubes[real], reference[real], seed=0)["accuracy"],
        }
    return figures


def spread(values: list[float | None]) -> dict:
    """The values over the sets, their median and their range (sets without a value left out)."""
    found = [value for value in values if value is not None]
    if not found:
        return {"values": values, "median": None, "range": None}
    return {"values": values, "median": round(float(np.median(found)), 3), "range": [min(found), max(found)]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--sets", type=int, default=SETS, help="independent sets of phantoms")
    parser.add_argument("--phantoms", type=int, default=20, help="phantoms per set (the evaluation's default run: 20)")
    parser.add_argument("--seed", type=int, default=SEED, help="the first set's phantom seed (then seed + 1, ...)")
    parser.add_argument(
        "--reference-seed", type=int, default=2024, help="the evaluation's held-out seed (its reference cubes)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "pristine_spread_cpu.json")
    args = parser.parse_args(argv)
    if args.sets < 1 or args.phantoms < 1:
        parser.error(f"--sets and --phantoms must be at least 1; got {args.sets} and {args.phantoms}")
    reference, _ = held_out_cubes(args.phantoms, args.reference_seed, keep_scans=False)
    seeds = list(range(args.seed, args.seed + args.sets))
    sets = [set_figures(held_out_cubes(args.phantoms, seed, keep_scans=False)[0], reference) for seed in tqdm(seeds)]
    report = {
        "device": describe_device("cpu"),
        "torch": torch.__version__,
        "phantoms_per_set": args.phantoms,
        "seeds": seeds,
        "reference_seed": args.reference_seed,
        "sets": sets,
        **{
            task: {
                figure: spread([figures[task][figure] for figures in sets])
                for figure in ("sites", "spectral_peak_ratio", "two_sample_accuracy")
            }
            for task in TASKS
        },
    }
    write_json_atomic(args.out, report, trailing_newline=True, sort_keys=False)
    print(json.dumps({task: report[task] for task in TASKS}, indent=2))
    return report


if __name__ == "__main__":
    main()
