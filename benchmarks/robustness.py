"""Robustness of trained detectors to the attacker's easy counter-moves, on a benchmark run's test split.

    python benchmarks/robustness.py --results demo_output/results --data demo_output/m3dsynth --detectors slab3d trufor

Each cross-generator cell of the chosen detectors in ``--results`` (its trained model,
``runs/<cell>/best``) is scored on the test crops of ``--data`` as `m3d bench` scores them, once as they
are and once after each counter-move. The attacker's local moves touch the fakes only, over the tampered
box (the bounding box of the fake's changed voxels), as an attacker would:

* ``noise``: Gaussian noise with the crop's own noise level (estimated from the in-plane Laplacian of
  the crop, median absolute deviation) added over the tampered box;
* ``blur``: a 3x3x3 mean filter over the tampered box.

The scan-wide moves stand for a processing path any scan may go through (a re-export), so they are
applied to every crop, pristine too (a detector must not call a scan fake because it was re-exported):

* ``requantize``: every HU rounded to a multiple of ``--quantum-hu`` (16), as a coarser export would;
* ``reslice``: the crop resampled across slices to ``--reslice-factor`` (1.5) times its slice spacing
  (linear in HU, nearest for the mask), as a re-reconstruction to thicker slices would.

Writes one JSON (``--out``, default ``benchmarks/results/robustness_demo.json``) naming the device, with a
row per (detector, train generator, counter-move, test generator): AUC with its 95 % interval and the
mean best-threshold F1; and prints the table.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from m3d.devices import describe_device
from m3d.files import write_json_atomic
from m3d.train.benchmark import load_cells
from m3d.train.detector_data import Crop, evaluation_crops, filter_examples, load_split
from m3d.train.evaluation import predict_samples, summarize
from m3d.train.train_detector import BEST_FOLDER, build_detector

LOCAL_MOVES = ("noise", "blur")  # the attacker's, on the fakes' tampered box
COUNTER_MOVES = ("none", *LOCAL_MOVES, "requantize", "reslice")
LAPLACIAN_NOISE_GAIN = np.sqrt(20.0)  # std of the 4-neighbour Laplacian [[0,1,0],[1,-4,1],[0,1,0]] of unit white noise
MAD_TO_STD = 1.4826


def noise_std_hu(hu: np.ndarray) -> float:
    """The noise level (HU) of a ``(z, y, x)`` volume: robust std of its slices' Laplacian over the
    white-noise gain."""
    laplacian = np.stack([ndimage.laplace(plane.astype(np.float32), mode="nearest") for plane in hu])
    return float(MAD_TO_STD * np.median(np.abs(laplacian - np.median(laplacian))) / LAPLACIAN_NOISE_GAIN)


def tampered_box(crop: Crop) -> tuple[slice, slice, slice]:
    """The bounding box of a fake crop's changed voxels."""
    return ndimage.find_objects(crop.mask.astype(np.int8))[0]


def counter_move(crop: Crop, move: str, rng: np.random.Generator, quantum_hu: int, reslice_factor: float) -> Crop:
    """``crop`` after one counter-move (see the module doc); ``none``, and a local move on a pristine
    crop, return it as it is."""
    if move == "none" or (move in LOCAL_MOVES and not crop.mask.any()):
        return crop
    hu = crop.hu.astype(np.float32)
    if move in LOCAL_MOVES:
        box = tampered_box(crop)
        if move == "noise":
            hu[box] += rng.normal(
                0.0, noise_std_hu(crop.hu[: crop.valid[0], : crop.valid[1], : crop.valid[2]]), hu[box].shape
            )
        else:
            hu[box] = ndimage.uniform_filter(hu, size=3, mode="nearest")[box]
        return replace(crop, hu=np.clip(np.rint(hu), -32768, 32767).astype(np.int16))
    if move == "requantize":
        return replace(crop, hu=(np.rint(hu / quantum_hu) * quantum_hu).astype(np.int16))
    depth = crop.valid[0]
    positions = np.arange(0.0, depth - 1 + 1e-6, reslice_factor)  # new slices, in old slice units
    lower = np.floor(positions).astype(int)
    upper = np.minimum(lower + 1, depth - 1)
    weight = (positions - lower)[:, None, None]
    resliced = (1 - weight) * hu[lower] + weight * hu[upper]
    mask = crop.mask[np.rint(positions).astype(int)]
    valid = (len(positions), crop.valid[1], crop.valid[2])
    return replace(crop, hu=np.rint(resliced).astype(np.int16), mask=mask, valid=valid)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--results", required=True, help="an `m3d bench` results folder (its runs/<cell>/best models)")
    parser.add_argument("--data", required=True, help="the M3Dsynth folder the benchmark ran on (its test split)")
    parser.add_argument(
        "--detectors", nargs="+", default=["slab3d", "trufor"], help="detectors whose cells are scored"
    )
    parser.add_argument("--quantum-hu", type=int, default=16, help="HU step of the re-quantisation")
    parser.add_argument("--reslice-factor", type=float, default=1.5, help="new slice spacing over the old one")
    parser.add_argument("--seed", type=int, default=0, help="seed of the added noise")
    parser.add_argument("--dataset-cache-dir", help="datasets' cache folder (default: HF_DATASETS_CACHE)")
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "robustness_demo.json"), help="JSON to write"
    )
    args = parser.parse_args(argv)
    if args.quantum_hu < 1 or args.reslice_factor <= 0:
        parser.error("--quantum-hu must be >= 1 and --reslice-factor > 0")
    cells = [
        c
        for c in load_cells(Path(args.results))
        if c["experiment"] == "cross_generator" and c["detector"] in args.detectors
    ]
    if not cells:
        parser.error(f"{args.results} holds no cross-generator cell of {', '.join(args.detectors)}")
    crop_size = tuple(int(n) for n in cells[0]["crop_size"].split(","))
    split = filter_examples(load_split(args.data, "test", args.dataset_cache_dir))
    crops = evaluation_crops(split, crop_size).fill()
    variants = {}
    for move in COUNTER_MOVES:
        rng = np.random.default_rng(args.seed)
        variants[move] = [counter_move(c, move, rng, args.quantum_hu, args.reslice_factor) for c in crops]
    rows = []
    for cell in cells:
        model = build_detector(model_path=str(Path(args.results) / "runs" / cell["cell"] / BEST_FOLDER))
        for move, moved in variants.items():
            records, _ = predict_samples(model, moved)
            metrics = summarize(records, model.config.volume_threshold)
            for generator, by_task in metrics.items():
                m = by_task["all"]
                rows.append(
                    {
                        "detector": cell["detector"],
                        "train_data": cell["train_data"],
                        "counter_move": move,
                        "test_generator": generator,
                        "auc": m["auc"],
                        "auc_low": m["auc_low"],
                        "auc_high": m["auc_high"],
                        "balanced_accuracy": m["balanced_accuracy"],
                        "f1_best": m["f1_best"],
                    }
                )
            print(
                f"{cell['detector']:>9} {cell['train_data']:>9} {move:>10}: "
                + "  ".join(
                    f"{r['test_generator']} AUC {r['auc']:.3f} F1 "
                    f"{r['f1_best'] if r['f1_best'] is None else round(r['f1_best'], 3)}"
                    for r in rows[-len(metrics) :]
                ),
                flush=True,
            )
    device = describe_device("cpu")
    result = {
        "device": device,
        "torch": torch.__version__,
        "results": str(args.results),
        "data": str(args.data),
        "settings": {
            "quantum_hu": args.quantum_hu,
            "reslice_factor": args.reslice_factor,
            "seed": args.seed,
            "local_moves": list(LOCAL_MOVES),
            "crop_size": list(crop_size),
        },
        "rows": rows,
    }
    out = write_json_atomic(Path(args.out), result, indent=1, sort_keys=False)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
