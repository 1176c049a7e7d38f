"""Learning curves of the m3d detectors: training loss, and loss / AUC on the training and test crops,
every ``--eval-every`` steps of the real training path (`m3d.train.train_detector`, resumed between
evaluation points), for each detector on one or more fixed M3Dsynth folders.

    python benchmarks/learning_curves.py --data native=demo_output/m3dsynth scaled=/tmp/m3dsynth_128 \
        --generator pix2pix --steps 600 --eval-every 100

Evaluation is the benchmark's protocol (`m3d.train.evaluation`: fixed crops around the site, volume
score = max over the crop's slices) on the training split and on the test split; "loss" there is the
binary cross-entropy of the volume scores (what a detector that separates nothing scores: about 0.69
or more). Training settings default to the `m3d bench --preset demo` ones. One JSON per run, all rows in
it: ``benchmarks/results/learning_curves_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from m3d.detectors import DETECTORS
from m3d.devices import describe_device
from m3d.metrics import detection_metrics
from m3d.train import train_detector
from m3d.train.benchmark import BENCH_PRESETS
from m3d.train.detector_data import evaluation_crops, filter_examples, load_split
from m3d.train.evaluation import predict_samples

RESULTS = Path(__file__).resolve().parent / "results"


def volume_scores(model, crops) -> dict[str, float | None]:
    """AUC and volume-level BCE of ``model`` on evaluation crops (fakes vs pristine)."""
    records, _ = predict_samples(model, crops)
    labels = np.array([r["label"] == "fake" for r in records], int)
    scores = np.clip(np.array([r["score"] for r in records], float), 1e-6, 1 - 1e-6)
    loss = float(-np.mean(labels * np.log(scores) + (1 - labels) * np.log(1 - scores)))
    auc = detection_metrics(labels, scores)["auc"] if 0 < labels.sum() < len(labels) else None
    return {
        "loss": loss,
        "auc": None if auc is None or not math.isfinite(auc) else float(auc),
        "n_fake": int(labels.sum()),
        "n_pristine": int(len(labels) - labels.sum()),
    }


def training_loss(run_dir: Path, since_step: int) -> float | None:
    """Mean logged training loss after ``since_step``."""
    losses = [
        r["loss"]
        for r in map(json.loads, (run_dir / "logs.jsonl").read_text().splitlines())
        if "loss" in r and r["step"] > since_step
    ]
    return float(np.mean(losses)) if losses else None


def curve(name: str, data: str, detector: str, args, work: Path) -> list[dict]:
    preset = BENCH_PRESETS["demo"]
    crop = tuple(args.crop_size)
    train_split = filter_examples(load_split(data, "train", args.dataset_cache_dir), [args.generator])
    test_split = filter_examples(load_split(data, "test", args.dataset_cache_dir), [args.generator])
    run_dir = work / f"{name}-{detector}"
    rows, previous = [], 0
    for step in range(args.eval_every, args.steps + 1, args.eval_every):
        argv = [
            "--detector",
            detector,
            "--preset",
            preset["detector_preset"],
            "--data",
            data,
            "--generators",
            args.generator,
            "--crop-size",
            ",".join(map(str, crop)),
            "--output-dir",
            str(run_dir),
            "--num-epochs",
            "1000",
            "--max-steps",
            str(step),
            "--batch-size",
            str(args.batch_size),
            "--learning-rate",
            str(args.learning_rate),
            "--validation-split",
            "none",
            "--resume-from-checkpoint",
            "latest",
            "--log-every",
            "5",
            "--seed",
            str(args.seed),
            "--cpu",
            "--no-progress",
        ]
        start = time.perf_counter()
        if train_detector.main(argv) != 0:
            raise RuntimeError(f"training {detector} on {data} failed")
        seconds = time.perf_counter() - start
        model = train_detector.build_detector(model_path=str(run_dir / train_detector.BEST_FOLDER))
        config = model.config
        row = {
            "data": name,
            "detector": detector,
            "step": step,
            "train_seconds": round(seconds, 2),
            "train_loss": training_loss(run_dir, previous),
        }
        for split_name, split in (("train", train_split), ("test", test_split)):
            scores = volume_scores(model, evaluation_crops(split, crop, config))
            row.update({f"{split_name}_{key}": value for key, value in scores.items()})
        print(json.dumps(row), flush=True)
        rows.append(row)
        previous = step
    return rows


def main() -> None:
    preset = BENCH_PRESETS["demo"]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", required=True, metavar="NAME=DIR", help="M3Dsynth folders, each named")
    parser.add_argument("--detectors", nargs="+", choices=list(DETECTORS), default=list(DETECTORS))
    parser.add_argument("--generator", default="pix2pix", help="train and test on this generator's fakes")
    parser.add_argument("--steps", type=int, default=600, help="training steps in all")
    parser.add_argument("--eval-every", type=int, default=100, help="steps between evaluation points")
    parser.add_argument(
        "--crop-size",
        type=lambda t: [int(v) for v in t.split(",")],
        default=list(preset["crop_size"]),
        metavar="Z,Y,X",
        help="training and evaluation crop (voxels)",
    )
    parser.add_argument("--batch-size", type=int, default=preset["batch_size"], help="slices per step")
    parser.add_argument("--learning-rate", type=float, default=preset["learning_rate"])
    parser.add_argument("--threads", type=int, default=preset["num_threads"] or 2, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset-cache-dir", help="datasets' cache folder (default: HF_DATASETS_CACHE)")
    parser.add_argument(
        "--out", type=Path, default=None, help="result JSON (default: results/learning_curves_<device>.json)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folders = dict(entry.split("=", 1) for entry in args.data)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name, data in folders.items():
            for detector in args.detectors:
                rows += curve(name, data, detector, args, Path(work))
    device = describe_device("cpu")
    out = args.out or RESULTS / f"learning_curves_{device.split('(')[0].strip().lower().replace(' ', '_')[:40]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    out.write_text(
        json.dumps({"device": device, "settings": settings, "data": folders, "rows": rows}, indent=1, default=str)
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
