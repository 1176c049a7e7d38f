"""Train and ship the starting weights of the demo benchmark's detectors,
``m3d/detectors/demo/<detector>-<train_data>/``, on phantom data that the demo never tests on.

    m3d build --out runs/detector-pretraining --phantoms 30 --seed 1 --generators pix2pix cyclegan \
        --split-patients 1,0,0
    python -m m3d.train.demo_detectors --data runs/detector-pretraining --runs-dir runs/demo-detectors
    python -m m3d.train.demo_detectors --data runs/detector-pretraining --runs-dir runs/demo-detectors \
        --only hpfcn-pix2pix

Why: on 2 CPU cores the demo has about 20 s per benchmark cell, a few hundred steps of a tiny detector,
which is not enough for the slower architectures (TruFor, MVSS-Net, ManTraNet) to learn from scratch.
So, as the generators ship phantom-trained weights, each demo cell starts from weights pre-trained on
the fakes of its own training generator only (``pix2pix``, ``cyclegan``, or ``m3dsynth`` = both for the
preliminary experiment's general-purpose detector), made from other synthetic patients (build seed 1;
the demo builds seed 0), and fine-tunes them on the demo's training split. Nothing a cell is tested on
was seen in pre-training, and no cell starts from weights that saw another generator's fakes, so the
cross-generator table keeps its meaning. Each recipe is an `m3d train-detector` command line
(`command_line`); shipping copies ``RUNS/<name>/best`` into the package with its model card.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

DEMO_DIR = Path(__file__).resolve().parents[1] / "detectors" / "demo"
TRAIN_DATA = ("pix2pix", "cyclegan")
# (detector, steps, learning rate): tiny detectors, 16 slices per step, 16x64x64 crops.
SCHEDULE = {
    "xception": (1600, 1e-2),
    "unet": (800, 1e-2),
    "hpfcn": (800, 1e-2),
    "mantranet": (2400, 4e-3),
    "mvssnet": (1200, 1e-2),
    "trufor": (1800, 1e-2),
    "slab3d": (1200, 1e-2),
    "resnet_gp": (1600, 1e-2),
}
# recipes that learn at another rate than their detector's: at 1e-2 the CycleGAN U-Net's output saturated (24 % of its
# training scan pairs tied, 2026-12-04); the pix2pix one's saturated at 1e-2 (33 %) and 5e-3 (63 %) on the build of
# 2026-12-05, and at 2e-3 ties none of them (2e-2: 0.02 %)
LEARNING_RATES = {"unet-cyclegan": 5e-3, "unet-pix2pix": 2e-3}
# a detector whose volume scores separate its own training scans no better than this is not shipped: its detection
# output has collapsed (a dead ReLU layer gives every scan the same score)
MIN_TRAIN_BALANCED_ACCURACY = 0.6
RECIPES: dict[str, tuple[str, str]] = {
    **{f"{detector}-{data}": (detector, data) for detector in SCHEDULE for data in TRAIN_DATA},
    "resnet_gp-m3dsynth": ("resnet_gp", "m3dsynth"),  # the preliminary experiment's detector trained on M3Dsynth
}


def starting_weights(detector: str, train_data: str) -> Path | None:
    """The shipped starting weights of a demo cell, or None."""
    folder = DEMO_DIR / f"{detector}-{train_data}"
    return folder if (folder / "config.json").is_file() else None


def command_line(name: str, data: str | Path, runs_dir: str | Path) -> list[str]:
    """The `m3d train-detector` arguments of recipe ``name``, writing to ``runs_dir/name``."""
    detector, train_data = RECIPES[name]
    steps, learning_rate = SCHEDULE[detector]
    learning_rate = LEARNING_RATES.get(name, learning_rate)
    argv = [
        "--detector",
        detector,
        "--preset",
        "tiny",
        "--data",
        str(data),
        "--crop-size",
        "16,64,64",
        "--batch-size",
        "16",
        "--learning-rate",
        str(learning_rate),
        "--lr-scheduler",
        "cosine",
        "--warmup-steps",
        "20",
        "--num-epochs",
        "1000",
        "--max-steps",
        str(steps),
        "--validation-split",
        "none",
        "--seed",
        "1",
        "--resume-from-checkpoint",
        "latest",
        "--log-every",
        "20",
        "--output-dir",
        str(Path(runs_dir) / name),
        "--cpu",
    ]
    return argv if train_data == "m3dsynth" else [*argv, "--generators", train_data]


def provenance(name: str, run_dir: Path, data: str | Path) -> str:
    from .common import training_seconds

    summary = json.loads((run_dir / "training_summary.json").read_text())
    losses = [json.loads(line) for line in (run_dir / "logs.jsonl").read_text().splitlines()]
    losses = [r for r in losses if "loss" in r]
    argv = " ".join(command_line(name, "runs/detector-pretraining", "runs/demo-detectors"))
    return "\n".join(
        [
            "Starting weights of the `m3d demo` benchmark cell of this detector and training set, trained on m3d's",
            "synthetic chest CT only (phantoms on real LIDC-IDRI geometry with real nodule contours; build seed 1,",
            "patients the demo never tests on), on a CPU:",
            "",
            "```bash",
            "m3d build --out runs/detector-pretraining --phantoms 30 --seed 1 --generators pix2pix "
            "cyclegan --split-patients 1,0,0",
            f"m3d train-detector {argv}",
            "```",
            "",
            f"- {summary['steps']} optimizer steps of 16 slices, {training_seconds(losses) / 60:.1f} "
            "min of training on one CPU thread; loss "
            f"{losses[0]['loss']:.3f} (step {losses[0]['step']}) -> {losses[-1]['loss']:.3f} (step "
            f"{losses[-1]['step']}).",
            "- Fine-tuned and measured by `m3d demo` / `m3d bench --preset demo`; not a detector to "
            "use on real scans.",
        ]
    )


def ship(name: str, runs_dir: str | Path, data: str | Path) -> Path:
    """Copy ``runs_dir/name/best`` to ``m3d/detectors/demo/name`` (replacing it; its weights, config and image
    processor, not its code) with its model card."""
    from ..model_cards import write_model_card
    from .common import replace_folder
    from .train_detector import MAX_TIED_PAIR_FRACTION

    run_dir = Path(runs_dir) / name
    source = run_dir / "best"
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{source} is not a saved detector: train {name} first")
    calibration = json.loads((run_dir / "training_summary.json").read_text()).get("calibration") or {}
    accuracy = calibration.get("balanced_accuracy")
    if accuracy is not None and accuracy < MIN_TRAIN_BALANCED_ACCURACY:
        raise ValueError(
            f"{name} separates its own training scans with balanced accuracy {accuracy:.2f} (< "
            f"{MIN_TRAIN_BALANCED_ACCURACY}): its detection output has collapsed; not shipped"
        )
    tied = calibration.get("tied_pair_fraction")
    if tied is not None and tied > MAX_TIED_PAIR_FRACTION:  # nor one whose output has saturated
        raise ValueError(
            f"{name} gives {tied:.0%} of its training (fake, pristine) scan pairs the same score (> "
            f"{MAX_TIED_PAIR_FRACTION:.0%}): its detection output has saturated; not shipped"
        )
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    target = replace_folder(
        source, DEMO_DIR / name, files=("config.json", "model.safetensors", "preprocessor_config.json")
    )
    write_model_card(target, name=f"m3d demo {name}", provenance=provenance(name, run_dir, data))
    return target


def main(argv: Sequence[str] | None = None) -> int:
    from ..errors import run_guarded
    from .train_detector import main as train_detector

    parser = argparse.ArgumentParser(prog="python -m m3d.train.demo_detectors", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="the pre-training M3Dsynth folder (build seed 1, see above)")
    parser.add_argument("--runs-dir", default="runs/demo-detectors", help="training outputs go here")
    parser.add_argument("--only", nargs="+", choices=list(RECIPES), default=list(RECIPES), help="recipes to run")
    parser.add_argument("--ship-only", action="store_true", help="do not train: ship the runs already there")
    args = parser.parse_args(argv)

    def train_and_ship() -> int:
        import torch

        torch.set_num_threads(1)  # what the cards say; two recipes run side by side then share the cores cleanly
        for name in args.only:
            if not args.ship_only:
                code = train_detector([*command_line(name, args.data, args.runs_dir), "--no-progress"])
                if code:
                    return code
            print(f"shipped {ship(name, args.runs_dir, args.data)}", flush=True)
        return 0

    return run_guarded("demo_detectors", train_and_ship, (ValueError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
