"""The M3Dsynth benchmark: every detector x train generator x test generator, and the preliminary
experiment (a general-purpose detector trained on non-medical real/fake images vs on M3Dsynth).

    m3d bench --data m3dsynth --out results --preset demo
    accelerate launch -m m3d.train.benchmark --data m3dsynth --out results --preset default --mixed-precision bf16

Each *cell* trains one detector (`m3d.train.train_detector`) on one training set — one generator's
fakes plus the pristine scans (``cross_generator``), or for ``preliminary`` the ``resnet_gp`` detector on
the non-medical images or on every generator of M3Dsynth — then evaluates its best checkpoint on the
test split with `m3d.train.evaluation.evaluate_detector`'s protocol (fixed test crops, volume score = max over slices;
AUC, balanced accuracy at the detector's calibrated volume threshold, Pd@1 %; F1 / IoU at 0.5 and best threshold) for
every test generator. A finished cell's file is written atomically and never recomputed: re-running the command (after
an interruption, or with more detectors) does only what is missing; an interrupted training resumes from its last
checkpoint. The non-medical side reads ``--nonmedical DIR`` (any ``imagefolder`` with real/fake class folders); without
it a procedural stand-in is generated (`m3d.train.nonmedical`) and every output says so.

Results folder (what ``m3d report`` reads)::

    OUT/
      bench_config.json        settings of this folder (a re-run with other settings is refused)
      results.csv              one row per experiment x detector x train_data x test_generator x task
      results.json             {"meta": {...}, "rows": [as results.csv], "generalization": {detector: same vs other
                               generators, `cross_generator_summary`}, "samples": {cell: [per-sample records]}}
      tables.md                the paper's tables: F1 / IoU (0.5 and best threshold), Acc / Pd@1 %, AUC,
                               and the preliminary experiment
      plots/roc_<detector>.png         ROC per train generator (a curve per test generator)
      plots/roc_preliminary.png        ROC of resnet_gp trained on non-medical images vs on M3Dsynth
      plots/hist_<cell>.png            volume-score histograms, pristine vs each test generator
      plots/examples/<cell>.png        axial slices through the site: scan, ground truth, detector map
      cells/<cell>.json        one finished cell (metrics, per-sample records, training steps, timings)
      cells/<cell>_examples.npz        crops, masks and maps of a few fakes (the example plots)
      runs/<cell>/             the cell's training folder (best/, checkpoints/, logs.jsonl, tensorboard/)
      nonmedical_standin/      the generated stand-in images (only without --nonmedical)

``<cell>`` = ``<experiment>__<detector>__<train_data>``; ``experiment`` is ``cross_generator`` or
``preliminary``; ``train_data`` a generator name, ``m3dsynth`` (all generators) or ``nonmedical``.
CSV columns: experiment, detector, train_data, test_generator (a generator or ``all``), task (``all``,
``inject``, ``remove``), n_fake, n_pristine, auc, balanced_accuracy, pd_at_1pct, f1, iou, f1_best,
iou_best (empty when undefined, e.g. F1 of non-localizing detectors), volume_threshold (the detector's
decision threshold, set on its training scans by `train_detector`), crop_size, steps, preset.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from m3d.devices import describe_device
from m3d.errors import run_guarded
from m3d.files import write_atomic
from m3d.presets import lookup_preset
from m3d.constants import GENERATORS, TASKS
from m3d.detectors import DETECTORS
from m3d.train import train_detector
from m3d.train.common import configure_logging, dataclass_defaults, dealt, finite_or_none, gather_dealt, process_state
from m3d.train.demo_detectors import starting_weights
from m3d.train.detector_data import (
    DEFAULT_CROP_SIZE,
    CropCache,
    evaluation_crops,
    filter_examples,
    generators_present,
    load_split,
    parse_crop_size,
)
from m3d.train.evaluation import DETECTION_KEYS, LOCALIZATION_KEYS, cross_generator_summary, predict_samples, summarize
from m3d.train.nonmedical import STANDIN_NOTE, make_standin_images

EXPERIMENTS = ("cross_generator", "preliminary")
PRELIMINARY_DETECTOR = "resnet_gp"
REFERENCE_DETECTOR = (
    "trufor"  # the strongest published method of the paper's tables: the one m3d's own detector must beat
)
# the cross-generator grid: the paper's six forensic methods and m3d's own slab3d (the general-purpose detector is the
# preliminary experiment's)
FORENSIC_DETECTORS = tuple(name for name in DETECTORS if name != PRELIMINARY_DETECTOR)
BENCH_PRESETS: dict[str, dict[str, Any]] = {
    # tiny detectors on 16x64x64 crops at the scans' native resolution, each cell fine-tuned for 100 steps from
    # its shipped phantom-trained starting weights (`m3d.train.demo_detectors`): the grid on 2 CPU cores in minutes
    "demo": dict(
        detector_preset="tiny",
        crop_size=(16, 64, 64),
        num_epochs=100,
        max_steps=100,
        batch_size=16,
        learning_rate=2e-3,
        lr_scheduler="cosine",
        validation=False,
        standin_per_class=32,
        num_threads=1,
        starting_weights="demo",
    ),
    # the papers' detector sizes, validation-picked checkpoints (a GPU job)
    "default": dict(
        detector_preset="default",
        crop_size=DEFAULT_CROP_SIZE,
        num_epochs=10,
        max_steps=None,
        batch_size=16,
        learning_rate=1e-4,
        lr_scheduler="constant",
        validation=True,
        standin_per_class=1000,
        num_threads=None,
        starting_weights=None,
    ),
}
CSV_COLUMNS = (
    "experiment",
    "detector",
    "train_data",
    "test_generator",
    "task",
    "n_fake",
    "n_pristine",
    *DETECTION_KEYS,
    *LOCALIZATION_KEYS,
    "volume_threshold",
    "crop_size",
    "steps",
    "preset",
)
SETTINGS_KEYS = (
    "data",
    "preset",
    "crop_size",
    "num_epochs",
    "max_steps",
    "batch_size",
    "learning_rate",
    "validation",
    "tasks",
    "seed",
    "nonmedical",
    "starting_weights",
)

logger = logging.getLogger("m3d.train.benchmark")


@dataclass(frozen=True)
class Cell:
    experiment: str
    detector: str
    train_data: str

    @property
    def key(self) -> str:
        return f"{self.experiment}__{self.detector}__{self.train_data}"


# -- small helpers ------------------------------------------------------------------------------


def _crop_text(crop_size) -> str:
    return "full" if crop_size is None else ",".join(map(str, crop_size))


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


# -- arguments ----------------------------------------------------------------------------------


@dataclass(kw_only=True)
class BenchmarkArguments:
    """The options of `m3d bench` (fields = command-line options, with the same defaults), so that Python
    callers (`m3d demo`) run the benchmark with `run` rather than an argv list."""

    data: str
    out: str
    preset: str = "default"
    detectors: list[str] = field(default_factory=lambda: list(FORENSIC_DETECTORS))
    train_generators: list[str] | None = None
    tasks: list[str] | None = None
    experiments: list[str] = field(default_factory=lambda: list(EXPERIMENTS))
    nonmedical: str | None = None
    crop_size: str | None = None  # "Z,Y,X" or "full" (the whole scan); None: the preset's
    num_epochs: int | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    mixed_precision: str = "no"
    eval_batch_size: int = 32
    example_maps: int = 2
    cache_mb: int = 4096
    dataset_cache_dir: str | None = None
    cell_workers: int | None = None
    seed: int = 0
    cpu: bool = False
    no_progress: bool = False


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m m3d.train.benchmark",
        description="The M3Dsynth benchmark: train every detector on each generator, test on every generator "
        "(the paper's F1/IoU and Acc/Pd@1%% tables), plus the preliminary non-medical experiment. Writes one "
        "results folder; re-running skips finished cells.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", required=True, metavar="DIR", help="M3Dsynth folder (train and test splits)")
    parser.add_argument("--out", required=True, metavar="DIR", help="results folder")
    parser.add_argument(
        "--preset",
        choices=sorted(BENCH_PRESETS),
        help="demo: tiny detectors, a few steps (CPU minutes); default: the papers' sizes (GPU)",
    )
    parser.add_argument(
        "--detectors",
        nargs="+",
        choices=list(DETECTORS),
        help="detectors of the train x test generator grid (default: the paper's six forensic "
        "methods and m3d's slab3d; "
        f"{PRELIMINARY_DETECTOR} is the preliminary experiment's)",
    )
    parser.add_argument(
        "--train-generators",
        nargs="+",
        choices=[g for g in GENERATORS if g != "real"],
        default=None,
        help="default: every generator of the train split",
    )
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=None, help="default: both")
    parser.add_argument(
        "--experiments",
        nargs="+",
        choices=EXPERIMENTS,
        help="cross_generator: every detector x train generator x test generator; preliminary: the "
        "general-purpose detector trained on non-medical images vs on M3Dsynth",
    )
    parser.add_argument(
        "--nonmedical",
        metavar="DIR",
        default=None,
        help="imagefolder of non-medical real/fake images (default: a generated, labelled stand-in)",
    )
    parser.add_argument(
        "--crop-size", default=None, metavar="Z,Y,X|full", help="override the preset (full: whole scans)"
    )
    parser.add_argument("--num-epochs", type=int, default=None, help="override the preset")
    parser.add_argument("--max-steps", type=int, default=None, help="override the preset")
    parser.add_argument("--batch-size", type=int, default=None, help="override the preset")
    parser.add_argument("--learning-rate", type=float, default=None, help="override the preset")
    parser.add_argument(
        "--mixed-precision",
        choices=("no", "bf16", "fp16"),
        help="Accelerate mixed precision of the forward passes (bf16 on recent GPUs)",
    )
    parser.add_argument("--eval-batch-size", type=int, help="slices per forward pass when testing")
    parser.add_argument("--example-maps", type=int, help="fakes per cell kept for the example plots")
    parser.add_argument("--cache-mb", type=int, help="memory for decoded crops")
    parser.add_argument("--dataset-cache-dir", default=None, help="datasets' cache folder")
    parser.add_argument(
        "--cell-workers",
        type=int,
        default=None,
        metavar="N",
        help="cells trained at once in N processes of one thread each (default: one per CPU core for "
        "the demo preset's single-thread cells in a single-process run, else 1)",
    )
    parser.add_argument("--seed", type=int, help="seed of every cell's training")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when an accelerator is present")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(**dataclass_defaults(BenchmarkArguments))
    return parser


def settings_of(args: BenchmarkArguments) -> dict[str, Any]:
    """The settings that define a results folder: preset values with the command line's overrides."""
    preset = lookup_preset(BENCH_PRESETS, args.preset, "m3d benchmark --preset")
    for key in ("num_epochs", "max_steps", "batch_size", "learning_rate"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    if args.crop_size is not None:  # parsed here: "full" is None, which would read as "not given" in the field
        preset["crop_size"] = parse_crop_size(args.crop_size)
    return {
        "data": str(Path(args.data).resolve()),
        "preset": args.preset,
        **preset,
        "crop_size": _crop_text(preset["crop_size"]),
        "tasks": sorted(args.tasks or TASKS),
        "seed": args.seed,
        "nonmedical": str(Path(args.nonmedical).resolve()) if args.nonmedical else None,
    }


def plan_cells(args: BenchmarkArguments, train_generators: Sequence[str]) -> list[Cell]:
    cells = []
    if "cross_generator" in args.experiments:
        cells += [Cell("cross_generator", d, g) for d in args.detectors for g in train_generators]
    if "preliminary" in args.experiments:
        cells += [Cell("preliminary", PRELIMINARY_DETECTOR, source) for source in ("nonmedical", "m3dsynth")]
    return cells


# -- one cell -----------------------------------------------------------------------------------


def train_arguments(
    cell: Cell,
    settings: dict[str, Any],
    args: BenchmarkArguments,
    out: Path,
    images: Path | None,
    num_processes: int = 1,
) -> train_detector.TrainDetectorArguments:
    """The `train_detector` arguments of a cell: a new detector, or for the ``demo`` preset the cell's
    shipped starting weights (`m3d.train.demo_detectors`; the non-medical cell always starts new). The
    settings' batch is split over ``num_processes``: each step trains on the same slices however many
    processes share it."""
    start = starting_weights(cell.detector, cell.train_data) if settings.get("starting_weights") == "demo" else None
    options = (
        dict(model=str(start))
        if start is not None
        else dict(detector=cell.detector, preset=settings["detector_preset"])
    )
    if cell.train_data == "nonmedical":
        options["train_images"] = str(images)
    elif cell.train_data != "m3dsynth":
        options["generators"] = [cell.train_data]
    return train_detector.TrainDetectorArguments(
        **options,
        data=args.data,
        tasks=args.tasks,
        dataset_cache_dir=args.dataset_cache_dir,
        crop_size=parse_crop_size(settings["crop_size"]),
        output_dir=str(out / "runs" / cell.key),
        num_epochs=settings["num_epochs"],
        max_steps=settings["max_steps"] or None,
        batch_size=settings["batch_size"] // num_processes,
        learning_rate=settings["learning_rate"],
        lr_scheduler=settings["lr_scheduler"],
        seed=args.seed,
        mixed_precision=args.mixed_precision,
        eval_batch_size=args.eval_batch_size,
        cache_mb=args.cache_mb,
        resume_from_checkpoint="latest",
        log_every=5,
        validation_split="validation" if settings["validation"] else "none",
        cpu=args.cpu,
        no_progress=args.no_progress,
    )


def run_cell(
    cell: Cell, settings: dict[str, Any], args: BenchmarkArguments, out: Path, test_crops: dict, images: Path | None
) -> None:
    """Train (or resume) the cell's detector, evaluate its best checkpoint, write ``cells/<key>.json``."""
    from accelerate import PartialState

    state = PartialState()
    start = time.perf_counter()
    training_args = train_arguments(cell, settings, args, out, images, state.num_processes)
    status = train_detector.train(training_args)
    if status == 130:
        raise KeyboardInterrupt
    if status != 0:
        raise RuntimeError(f"training of {cell.key} failed (exit status {status})")
    train_s = time.perf_counter() - start
    run_dir = out / "runs" / cell.key
    model = train_detector.build_detector(model_path=str(run_dir / train_detector.BEST_FOLDER))
    if not args.cpu:
        model.to(state.device)
    config = model.config
    key = ("percentile", tuple(config.percentiles)) if config.input_mode == "percentile" else "shared"
    if key not in test_crops:
        test_crops[key] = evaluation_crops(test_crops["split"], test_crops["crop_size"], config, args.cache_mb << 20)
    crops: CropCache = test_crops[key]
    mine = dealt(len(crops), state.process_index, state.num_processes)
    records, examples = predict_samples(
        model,
        crops,
        mine,
        batch_size=args.eval_batch_size,
        keep_maps=args.example_maps,
        progress=state.is_main_process and not args.no_progress,
    )
    records = gather_dealt(records, len(crops), state.num_processes)
    if state.is_main_process:
        summary = json.loads((run_dir / "training_summary.json").read_text())
        result = {
            "cell": cell.key,
            "experiment": cell.experiment,
            "detector": cell.detector,
            "train_data": cell.train_data,
            "localizes": bool(type(model).localizes),
            "steps": summary["steps"],
            "best": summary["best"],
            "starting_weights": training_args.model,
            "train_s": round(train_s, 2),
            "eval_s": round(time.perf_counter() - start - train_s, 2),
            "crop_size": settings["crop_size"],
            "preset": settings["preset"],
            "volume_threshold": config.volume_threshold,
            "calibration": summary.get("calibration"),
            "metrics": summarize(records, config.volume_threshold),
            "samples": records,
        }
        if examples:
            buffer = io.BytesIO()
            arrays = {
                f"{name}_{i}": example[name] for i, example in enumerate(examples) for name in ("hu", "mask", "map")
            }
            np.savez_compressed(buffer, ids=np.array([e["info"]["img_id"] for e in examples]), **arrays)
            write_atomic(out / "cells" / f"{cell.key}_examples.npz", buffer.getvalue())
        write_atomic(out / "cells" / f"{cell.key}.json", json.dumps(finite_or_none(result), indent=1))
    state.wait_for_everyone()


_WORKER: dict[str, Any] = {}  # a cell worker process's arguments and decoded test crops


def _test_crops(args: BenchmarkArguments, crop_size) -> dict[str, Any]:
    """The test split and its evaluation crops, decoded on first use and shared by the cells of a process
    (`run_cell` adds per-scan variants for detectors that need them)."""
    test_split = filter_examples(load_split(args.data, "test", args.dataset_cache_dir), tasks=args.tasks)
    return {
        "split": test_split,
        "crop_size": crop_size,
        "shared": evaluation_crops(test_split, crop_size, None, args.cache_mb << 20),
    }


def _start_cell_worker(args: BenchmarkArguments, crop_size) -> None:
    import torch

    torch.set_num_threads(1)
    _WORKER.update(args=args, test_crops=_test_crops(args, crop_size))


def _run_cell_in_worker(cell: Cell, settings: dict[str, Any], out: Path, images: Path | None) -> str:
    run_cell(cell, settings, _WORKER["args"], out, _WORKER["test_crops"], images)
    return cell.key


# -- outputs ------------------------------------------------------------------------------------


def load_cells(out: Path) -> list[dict[str, Any]]:
    """Every finished cell of a results folder, in a stable order."""
    order = {e: i for i, e in enumerate(EXPERIMENTS)}
    cells = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]
    return sorted(
        cells,
        key=lambda c: (
            order[c["experiment"]],
            list(DETECTORS).index(c["detector"]),
            GENERATORS.index(c["train_data"]) if c["train_data"] in GENERATORS else 9,
            c["train_data"],
        ),
    )


def result_rows(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for cell in cells:
        for test_generator, by_task in cell["metrics"].items():
            for task, metrics in by_task.items():
                row = {
                    "experiment": cell["experiment"],
                    "detector": cell["detector"],
                    "train_data": cell["train_data"],
                    "test_generator": test_generator,
                    "task": task,
                }
                row.update({k: metrics.get(k) for k in ("n_fake", "n_pristine", *DETECTION_KEYS, *LOCALIZATION_KEYS)})
                row.update(
                    volume_threshold=cell.get("volume_threshold", 0.5),
                    crop_size=cell["crop_size"],
                    steps=cell["steps"],
                    preset=cell["preset"],
                )
                rows.append(row)
    return rows


def _table(cells: list[dict], test_generators: list[str], cell_text) -> list[str]:
    lines = [
        "| Detector | Train \\ Test | " + " | ".join(test_generators) + " |",
        "|---|---|" + "---|" * len(test_generators),
    ]
    for cell in cells:
        texts = [cell_text(cell, cell["metrics"].get(g, {}).get("all", {})) for g in test_generators]
        lines.append(f"| {cell['detector']} | {cell['train_data']} | " + " | ".join(texts) + " |")
    return lines


def tables_markdown(
    cells: list[dict[str, Any]], meta: dict[str, Any], generalization: dict[str, Any] | None = None
) -> str:
    """The paper's tables (test generators as columns, detector x train generator as rows), then each
    detector on its training generator vs the others (``generalization``: `cross_generator_summary` of
    the cross-generator cells, computed when not given)."""
    cross = [c for c in cells if c["experiment"] == "cross_generator"]
    preliminary = [c for c in cells if c["experiment"] == "preliminary"]
    test_generators = [g for g in GENERATORS if any(g in c["metrics"] for c in cells)] + ["all"]
    lines = [
        "# M3Dsynth benchmark",
        "",
        f"Preset `{meta['settings']['preset']}`, crops {meta['settings']['crop_size']} (z,y,x voxels), "
        f"tasks {', '.join(meta['settings']['tasks'])}, device {meta['device']}. Volume score = max over the "
        "crop's slices; Acc = balanced accuracy at the detector's volume threshold (the best balanced accuracy on "
        "its own training scans' crops: the max over slices of a slice classifier sits above 0.5 on pristine scans; "
        "results.csv gives each threshold); Pd@1% = TPR at 1% FPR (ROC linearly interpolated); "
        "F1 / IoU of the 3-D map per fake, averaged; each column = that generator's fakes vs all pristine crops.",
        "",
    ]
    if meta["settings"]["preset"] == "demo":
        lines += [
            "> `demo` preset: tiny detectors on 16x64x64 crops at the scans' native resolution, each fine-tuned "
            f"{meta['settings']['max_steps']} steps from its phantom-trained starting weights "
            "(`m3d.train.demo_detectors`) "
            "on a CPU; the paper's detector sizes are the `default` preset.",
            "",
        ]

    def localization(key_f1, key_iou):
        return lambda cell, m: "–" if not cell["localizes"] else f"{_fmt(m.get(key_f1))} / {_fmt(m.get(key_iou))}"

    if cross:
        lines += [
            "## Localization: F1 / IoU (threshold 0.5)",
            "",
            *_table(cross, test_generators, localization("f1", "iou")),
            "",
        ]
        lines += [
            "## Localization: F1 / IoU (best threshold per scan)",
            "",
            *_table(cross, test_generators, localization("f1_best", "iou_best")),
            "",
        ]
        lines += [
            "## Detection: Acc / Pd@1%",
            "",
            *_table(
                cross,
                test_generators,
                lambda c, m: f"{_fmt(m.get('balanced_accuracy'))} / {_fmt(m.get('pd_at_1pct'))}",
            ),
            "",
        ]
        lines += ["## Detection: AUC (95 % interval)", "", *_table(cross, test_generators, _auc_text), ""]
        lines += generalization_markdown(
            cross_generator_summary(cross, REFERENCE_DETECTOR) if generalization is None else generalization
        )
    if preliminary:
        lines += [
            "## Preliminary experiment: general-purpose detector (resnet_gp), Acc / Pd@1% / AUC",
            "",
            f"Non-medical training images: {meta['nonmedical']}.",
            "",
            *_table(
                preliminary,
                test_generators,
                lambda c, m: (
                    " / ".join(_fmt(m.get(k), 2) for k in ("balanced_accuracy", "pd_at_1pct"))
                    + " / "
                    + _auc_text(c, m)
                ),
            ),
            "",
        ]
    lines += findings_markdown(cells)
    return "\n".join(lines)


def _interval_text(value: list[float] | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    number = f"{value[0]:+.2f}" if signed else f"{value[0]:.2f}"
    return f"{number} ({value[1]:.2f}–{value[2]:.2f})"


def generalization_markdown(summary: dict[str, dict[str, Any]]) -> list[str]:
    """The table of `cross_generator_summary`: each detector's mean over its cells on its training
    generator and on the others, and its paired difference from the reference detector."""
    if not summary or all(s["other"]["auc"] is None for s in summary.values()):
        return []
    reference = f" − {REFERENCE_DETECTOR}" if any("minus_reference" in s for s in summary.values()) else ""
    lines = [
        "## Same vs other generators: mean over cells (95 % interval, bootstrap over the test samples)",
        "",
        "| Detector | AUC same | AUC other | F1 best same | F1 best other"
        + (f" | AUC other{reference} | F1 best other{reference} | AUC same{reference}" if reference else "")
        + " |",
        "|---|---|---|---|---" + ("|---|---|---" if reference else "") + "|",
    ]
    for detector, entry in summary.items():
        texts = [_interval_text(entry[group][metric]) for metric in ("auc", "f1_best") for group in ("same", "other")]
        if reference:
            minus = entry.get("minus_reference")
            texts += (
                ["–"] * 3
                if minus is None
                else [
                    _interval_text(minus["other"]["auc"], True),
                    _interval_text(minus["other"]["f1_best"], True),
                    _interval_text(minus["same"]["auc"], True),
                ]
            )
        lines.append(f"| {detector} | " + " | ".join(texts) + " |")
    return [*lines, ""]


def _auc_text(cell: dict, metrics: dict) -> str:
    if metrics.get("auc") is None:
        return "–"
    return f"{metrics['auc']:.3f} ({_fmt(metrics.get('auc_low'))}–{_fmt(metrics.get('auc_high'))})"


def _metric(cell: dict, generator: str, key: str = "auc") -> float | None:
    return cell["metrics"].get(generator, {}).get("all", {}).get(key)


def findings_markdown(cells: list[dict[str, Any]]) -> list[str]:
    """What the tables show, in words, read from the numbers: detection on the training generator,
    the drop on the others, and the preliminary experiment."""
    cross = [c for c in cells if c["experiment"] == "cross_generator"]
    lines = ["## What the tables show", ""]
    same = [(c, _metric(c, c["train_data"]), _metric(c, c["train_data"], "balanced_accuracy")) for c in cross]
    same = [(c, auc, acc) for c, auc, acc in same if auc is not None]
    if same:
        strong = [f"{c['detector']}/{c['train_data']}" for c, auc, acc in same if auc >= 0.9 and (acc or 0) >= 0.8]
        lines.append(
            "- **Same generator** (train = test): AUC "
            f"{min(a for _, a, _ in same):.2f}–{max(a for _, a, _ in same):.2f}; "
            f"{len(strong)} of {len(same)} cells reach AUC >= 0.90 with balanced accuracy >= 0.80"
            f"{' (' + ', '.join(strong) + ')' if strong else ''}."
        )
    drops = []
    for cell in cross:
        own = _metric(cell, cell["train_data"])
        for generator in cell["metrics"]:
            other = _metric(cell, generator)
            if generator not in ("all", cell["train_data"]) and own is not None and other is not None:
                drops.append((own - other, cell, generator, own, other))
    if drops:
        mean_drop = float(np.mean([d[0] for d in drops]))
        worst = max(drops, key=lambda d: d[0])
        change = f"falls by {mean_drop:.2f}" if mean_drop > 0 else f"rises by {-mean_drop:.2f}"
        lines.append(
            f"- **Across generators** (train != test): AUC {change} on average against the training "
            f"generator; the largest drop is {worst[1]['detector']} trained on "
            f"{worst[1]['train_data']}: {worst[3]:.2f} on {worst[1]['train_data']} -> {worst[4]:.2f} on {worst[2]}."
        )
        for train_data in sorted({d[1]["train_data"] for d in drops}):
            chosen = [d for d in drops if d[1]["train_data"] == train_data]
            lines.append(
                f"  - trained on {train_data}: mean AUC {np.mean([d[3] for d in chosen]):.2f} on {train_data}, "
                + ", ".join(
                    f"{np.mean([d[4] for d in chosen if d[2] == g]):.2f} on {g}"
                    for g in sorted({d[2] for d in chosen})
                )
                + "."
            )
    preliminary = {c["train_data"]: _metric(c, "all") for c in cells if c["experiment"] == "preliminary"}
    if preliminary.get("nonmedical") is not None and preliminary.get("m3dsynth") is not None:
        lines.append(
            f"- **Preliminary experiment**: the general-purpose detector trained on non-medical real/fake images "
            f"scores AUC {preliminary['nonmedical']:.2f} on M3Dsynth; the same architecture trained on M3Dsynth "
            f"{preliminary['m3dsynth']:.2f}."
        )
    return [*lines, ""] if len(lines) > 2 else []


def write_plots(out: Path, cells: list[dict[str, Any]]) -> list[Path]:
    """ROC curves, score histograms and example slices (matplotlib, Agg) under ``out/plots``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from m3d.metrics import roc_curve
    from m3d.report.figures import LUNG_WINDOW_HU, save_figure

    written = []

    def curve(samples, generator):
        chosen = [s for s in samples if s["label"] == "pristine" or s["generator"] == generator or generator == "all"]
        labels = np.array([s["label"] == "fake" for s in chosen], int)
        if labels.min(initial=1) == labels.max(initial=0):
            return None
        fpr, tpr, _ = roc_curve(labels, np.array([s["score"] for s in chosen]))
        return fpr, tpr

    groups: dict[str, list[dict]] = {}
    for cell in cells:
        name = "preliminary" if cell["experiment"] == "preliminary" else cell["detector"]
        groups.setdefault(name, []).append(cell)
    for name, group in groups.items():
        figure, axes = plt.subplots(1, len(group), figsize=(3.6 * len(group), 3.4), squeeze=False)
        for axis, cell in zip(axes[0], group):
            for generator in [g for g in cell["metrics"] if g != "all"] + ["all"]:
                points = curve(cell["samples"], generator)
                if points is not None:
                    axis.plot(*points, label=generator, lw=1.4, ls="--" if generator == "all" else "-")
            axis.plot([0, 1], [0, 1], color="0.8", lw=0.8)
            axis.axvline(0.01, color="0.6", lw=0.6, ls=":")
            axis.set(
                title=f"{cell['detector']} trained on {cell['train_data']}",
                xlabel="FPR",
                ylabel="TPR",
                xlim=(0, 1),
                ylim=(0, 1.01),
            )
            axis.legend(fontsize=7, loc="lower right")
        written.append(save_figure(figure, out / "plots" / f"roc_{name}.png"))
    for cell in cells:
        figure, axis = plt.subplots(figsize=(4.2, 3.0))
        bins = np.linspace(0, 1, 21)
        for generator in ["real", *[g for g in GENERATORS[1:] if g in cell["metrics"]]]:
            scores = [s["score"] for s in cell["samples"] if s["generator"] == generator]
            if scores:
                axis.hist(scores, bins=bins, alpha=0.5, label="pristine" if generator == "real" else generator)
        axis.set(title=f"{cell['detector']} / {cell['train_data']}: volume scores", xlabel="score", ylabel="crops")
        axis.legend(fontsize=7)
        written.append(save_figure(figure, out / "plots" / f"hist_{cell['cell']}.png"))
        examples_path = out / "cells" / f"{cell['cell']}_examples.npz"
        if not examples_path.is_file():
            continue
        with np.load(examples_path) as stored:
            ids = list(stored["ids"])
            figure, axes = plt.subplots(len(ids), 3, figsize=(7.5, 2.6 * len(ids)), squeeze=False)
            for row, img_id in enumerate(ids):
                hu, mask, heat = (stored[f"{k}_{row}"] for k in ("hu", "mask", "map"))
                z = int(np.argmax(mask.sum(axis=(1, 2))))
                for axis, title in zip(axes[row], ("scan", "ground truth", "detector map")):
                    axis.imshow(hu[z], cmap="gray", vmin=LUNG_WINDOW_HU[0], vmax=LUNG_WINDOW_HU[1])
                    if title == "ground truth":
                        axis.contour(mask[z], levels=[0.5], colors="lime", linewidths=0.8)
                    if title == "detector map":
                        axis.imshow(heat[z], cmap="inferno", vmin=0, vmax=1, alpha=0.55)
                    axis.set_title(f"{img_id} z={z}: {title}" if title == "scan" else title, fontsize=7)
                    axis.axis("off")
        written.append(save_figure(figure, out / "plots" / "examples" / f"{cell['cell']}.png"))
    return written


def write_outputs(out: str | Path, meta: dict[str, Any] | None = None) -> dict[str, Path]:
    """(Re)write results.csv, results.json, tables.md and plots/ from the finished cells of ``out``."""
    out = Path(out)
    cells = load_cells(out)
    if not cells:
        raise ValueError(f"{out} holds no finished benchmark cell")
    meta = meta or json.loads((out / "results.json").read_text())["meta"]
    meta = {**meta, "cells": [c["cell"] for c in cells]}
    rows = result_rows(cells)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    paths = {"csv": out / "results.csv", "json": out / "results.json", "tables": out / "tables.md"}
    write_atomic(paths["csv"], buffer.getvalue())
    cross = [c for c in cells if c["experiment"] == "cross_generator"]
    generalization = cross_generator_summary(cross, REFERENCE_DETECTOR) if cross else {}
    results = {
        "meta": meta,
        "rows": rows,
        "generalization": generalization,
        "samples": {c["cell"]: c["samples"] for c in cells},
    }
    write_atomic(paths["json"], json.dumps(finite_or_none(results), indent=1))
    write_atomic(paths["tables"], tables_markdown(cells, meta, generalization))
    write_plots(out, cells)
    return paths


# -- main ---------------------------------------------------------------------------------------


def run(args: BenchmarkArguments) -> int:
    import torch
    from tqdm.auto import tqdm

    state = process_state(args.cpu)
    configure_logging(logger, "benchmark", state.is_main_process)
    num_threads = lookup_preset(BENCH_PRESETS, args.preset, "m3d benchmark --preset")["num_threads"]
    if num_threads:  # tiny models: intra-op threads only add contention
        torch.set_num_threads(num_threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = settings_of(args)
    if settings["batch_size"] % state.num_processes:
        raise ValueError(
            f"the batch of {settings['batch_size']} slices does not split over {state.num_processes} processes: "
            "choose --batch-size a multiple of the number of processes"
        )
    config_path = out / "bench_config.json"
    if config_path.is_file():
        previous = json.loads(config_path.read_text())
        changed = sorted(k for k in SETTINGS_KEYS if previous.get(k) != settings.get(k))
        if changed:
            raise ValueError(f"{out} holds results made with other settings ({', '.join(changed)}); use another --out")
    elif state.is_main_process:
        write_atomic(config_path, json.dumps(settings, indent=2))

    train_split = filter_examples(load_split(args.data, "train", args.dataset_cache_dir), tasks=args.tasks)
    available = generators_present(train_split)
    train_generators = args.train_generators or available
    missing = sorted(set(train_generators) - set(available))
    if missing:
        raise ValueError(
            f"the train split holds no fakes of {', '.join(missing)} (has {', '.join(available) or 'none'})"
        )
    crop_size = parse_crop_size(settings["crop_size"])
    test_crops = _test_crops(args, crop_size)

    cells = plan_cells(args, train_generators)
    images = None
    nonmedical = "none (preliminary experiment not run)"
    if any(c.train_data == "nonmedical" for c in cells):
        if args.nonmedical:
            images, nonmedical = Path(args.nonmedical), f"imagefolder {args.nonmedical}"
        else:
            images, nonmedical = out / "nonmedical_standin", STANDIN_NOTE
            if state.is_main_process:
                size = crop_size[1] if crop_size is not None else 256
                make_standin_images(images, settings["standin_per_class"], size, seed=args.seed)
            state.wait_for_everyone()
    meta = {
        "settings": settings,
        "nonmedical": nonmedical,
        "device": describe_device("cuda" if torch.cuda.is_available() else "cpu"),
        "num_processes": state.num_processes,
        "train_generators": train_generators,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "python": sys.version.split()[0],
    }

    todo = [c for c in cells if not (out / "cells" / f"{c.key}.json").is_file()]
    logger.info("%d cells, %d done, %d to run", len(cells), len(cells) - len(todo), len(todo))
    start = time.perf_counter()
    workers = args.cell_workers or (os.cpu_count() or 1 if num_threads == 1 else 1)
    workers = min(workers, len(todo)) if state.num_processes == 1 else 1
    bar = tqdm(
        total=len(todo), desc="benchmark cells", unit="cell", disable=not state.is_main_process or args.no_progress
    )
    if workers > 1:  # independent cells, each in a one-thread process: the cores stay busy with tiny models
        from concurrent.futures import ProcessPoolExecutor, as_completed
        from multiprocessing import get_context

        with ProcessPoolExecutor(
            workers, mp_context=get_context("spawn"), initializer=_start_cell_worker, initargs=(args, crop_size)
        ) as pool:
            for finished in as_completed(
                [pool.submit(_run_cell_in_worker, cell, settings, out, images) for cell in todo]
            ):
                finished.result()
                bar.update()
    else:
        for cell in todo:
            run_cell(cell, settings, args, out, test_crops, images)
            bar.update()
    bar.close()
    if state.is_main_process:
        paths = write_outputs(out, meta)
        logger.info(
            "%d cells in %.1f s; wrote %s", len(todo), time.perf_counter() - start, ", ".join(map(str, paths.values()))
        )
        print(paths["tables"].read_text())
    return 0


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Entry point (`m3d bench`): 0 done, 2 bad input, 130 interrupted (finished cells are kept)."""
    args = BenchmarkArguments(**vars(build_parser(prog).parse_args(argv)))
    return run_guarded(
        "benchmark",
        lambda: run(args),
        (ValueError, FileNotFoundError, NotADirectoryError),
        on_interrupt="finished cells are kept, re-run the same command to go on",
    )


if __name__ == "__main__":
    sys.exit(main())
