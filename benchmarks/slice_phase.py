"""Does a generator continue the scan's slice structure in the hole, or paint a modulation of its own?

    .venv/bin/python benchmarks/slice_phase.py                      # the evaluation's 20 held-out phantoms
    .venv/bin/python benchmarks/slice_phase.py --phantoms 4 --pipelines pipelines/demo/pix2pix-remove

The cubes are cut at 1 mm from thick-slice series, so the mean HU of the hole's z planes rises and falls with the
slices (period 2.5 voxels for 2.5 mm slices), at a phase set by where the slices fall relative to the cube: a
different phase at every site. `eval_demo_pipelines.spectral_peak` finds the GAN removers' peak at exactly this
frequency (index 8 of `HOLE_SIZE` along z). This measures, per pipeline and for the pristine cubes of its sites,
on one draw (generation seed 0):

* ``amplitude_hu_median``: the median over sites of `plane_modulation`'s magnitude (HU), how strong it is;
* ``phase_concentration``: the length of the mean unit phasor over sites (1: the same phase at every site, a
  pattern fixed to the hole; about ``1 / sqrt(sites)``: phases as scattered as the real slices'), with that
  chance level beside it;
* ``slice_bin``: the bin (index 8, 0, 0) of the holes' mean high-pass power spectrum
  (`eval_demo_pipelines.hole_power_spectrum`, HU^2): its ``power``, the ``background`` it is measured against
  (the median of its 5^3 neighbouring bins, as `spectral_peak`) and their ``ratio``, so that a peak can be told
  from a pattern of its own (high power) or a hole too smooth around it (low background).

A generator that continued the scan would have real cubes' scattered phases; one that draws its own fixed
pattern concentrates them. Each pipeline is measured twice: on the ``cube`` it returns and ``in_the_scan``, the
cube pasted into its scan (`paste_cube`, as the pipeline pastes into a volume: resampled onto the scan's own
slices) and cut again at 1 mm (`extract_cube`), which is what a reader of the tampered scan gets (the pristine
cubes are the same either way). And once ``without_slices``: on cubes with no slices at all (``slice_free``: lung-like
white noise, -850 +- 40 HU, `two_sample_test.synthetic_cubes`, as many as the task's sites), where a modulation at
the slice period can only be the network's own. Results: ``benchmarks/results/slice_phase_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from tqdm.auto import tqdm

from m3d.constants import TASKS
from m3d.devices import describe_device
from m3d.files import write_json_atomic

from two_sample_test import synthetic_cubes  # this folder is on sys.path as a script
from eval_demo_pipelines import (
    CUBE_SIZE,
    HOLE_SIZE,
    ROOT,
    demo_folders,
    generate,
    held_out_cubes,
    hole_mask,
    hole_power_spectrum,
    in_the_scan,
    load_pipeline,
    spectral_background,
)

SLICE_FREQUENCY_INDEX = 8  # of HOLE_SIZE along z: period 2.5 voxels, the 2.5 mm slices at 1 mm
DETREND_SIGMA_PLANES = 2.0  # the plane means' slow trend (the nodule's own profile), taken out first


def plane_modulation(cubes_hu: np.ndarray, frequency_index: int = SLICE_FREQUENCY_INDEX) -> np.ndarray:
    """Per cube ``(N, CUBE_SIZE, CUBE_SIZE, CUBE_SIZE)``: the complex amplitude (HU) at ``frequency_index`` /
    `HOLE_SIZE` of the hole's z-plane means (each over the hole's in-plane square), detrended and Hann-windowed;
    scaled so that a sinusoid of amplitude A HU at that frequency gives about A."""
    cubes_hu = np.asarray(cubes_hu, dtype=np.float64)
    if cubes_hu.ndim != 4 or cubes_hu.shape[1:] != (CUBE_SIZE,) * 3:
        raise ValueError(f"cubes must be (N, {CUBE_SIZE}, {CUBE_SIZE}, {CUBE_SIZE}); got shape {cubes_hu.shape}")
    holes = cubes_hu[:, hole_mask()].reshape((len(cubes_hu),) + (HOLE_SIZE,) * 3)
    plane_means = holes.mean(axis=(2, 3))
    plane_means = plane_means - ndimage.gaussian_filter1d(plane_means, DETREND_SIGMA_PLANES, axis=1)
    window = np.hanning(HOLE_SIZE)
    return 2 * np.fft.fft(plane_means * window, axis=1)[:, frequency_index] / window.sum()


def phase_concentration(amplitudes: np.ndarray) -> float:
    """The length of the mean unit phasor of ``amplitudes`` (0-1; sites with no modulation at all left out)."""
    amplitudes = np.asarray(amplitudes)[np.abs(amplitudes) > 0]
    if not len(amplitudes):
        raise ValueError("phase_concentration needs at least one nonzero amplitude")
    return float(abs(np.mean(amplitudes / np.abs(amplitudes))))


def slice_bin(cubes_hu: np.ndarray, frequency_index: int = SLICE_FREQUENCY_INDEX) -> dict:
    """The power (HU^2) of the holes' mean high-pass spectrum at (``frequency_index``, 0, 0), the median of its
    neighbouring bins that `eval_demo_pipelines.spectral_peak` measures it against (`spectral_background`), and their
    ratio."""
    power = hole_power_spectrum(cubes_hu)
    background = spectral_background(power)
    line = (frequency_index, 0, 0)
    return {
        "power": round(float(power[line]), 0),
        "background": round(float(background[line]), 0),
        "ratio": round(float(power[line] / background[line]), 2),
    }


def figures(cubes_hu: np.ndarray) -> dict:
    """`plane_modulation`'s median magnitude and `phase_concentration` over ``cubes_hu``, with the chance level,
    and the `slice_bin`."""
    amplitudes = plane_modulation(cubes_hu)
    return {
        "sites": len(cubes_hu),
        "amplitude_hu_median": round(float(np.median(np.abs(amplitudes))), 2),
        "phase_concentration": round(phase_concentration(amplitudes), 2),
        "phase_concentration_chance": round(1 / np.sqrt(len(cubes_hu)), 2),
        "slice_bin": slice_bin(cubes_hu),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__[__doc__.index("\n\n") + 2 :],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--pipelines", type=Path, nargs="+", help="pipeline folders (default: the demo folders)")
    parser.add_argument("--phantoms", type=int, default=20, help="held-out phantoms (the evaluation's: 20)")
    parser.add_argument("--seed", type=int, default=2024, help="held-out phantom seed (the evaluation's: 2024)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "slice_phase_cpu.json")
    args = parser.parse_args(argv)
    if args.phantoms < 1:
        parser.error(f"--phantoms must be at least 1; got {args.phantoms}")
    cubes, scans = held_out_cubes(args.phantoms, args.seed)
    slice_free = synthetic_cubes(max(len(found) for found in cubes.values()), np.random.default_rng(args.seed))
    report = {
        "device": describe_device("cpu"),
        "torch": torch.__version__,
        "phantoms": args.phantoms,
        "seed": args.seed,
        "generation_seed": 0,
        "frequency_index": SLICE_FREQUENCY_INDEX,
        "pristine": {task: figures(cubes[task]) for task in TASKS if len(cubes[task])},
        "slice_free": figures(slice_free),
        "pipelines": {},
    }
    for folder in tqdm(args.pipelines or demo_folders(), desc="pipelines"):
        pipe = load_pipeline(folder)
        task = pipe.config.task
        if len(cubes[task]):
            generated, replaced, _ = generate(pipe, cubes[task], seed=0)
            report["pipelines"][folder.name] = {
                "task": task,
                "cube": figures(generated),
                "in_the_scan": figures(in_the_scan(generated, replaced, scans, task)),
                "without_slices": figures(generate(pipe, slice_free[: len(cubes[task])], seed=0)[0]),
            }
    write_json_atomic(args.out, report, trailing_newline=True, sort_keys=False)
    print(json.dumps({key: report[key] for key in ("pristine", "slice_free", "pipelines")}, indent=2))
    return report


if __name__ == "__main__":
    main()
