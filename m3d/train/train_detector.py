"""Fine-tune one forensic detector on M3Dsynth (or on a folder of non-medical real/fake images).

    m3d train-detector --detector unet --preset tiny --data m3dsynth --generators pix2pix --output-dir runs/unet
    accelerate launch -m m3d.train.train_detector --detector trufor --data m3dsynth --mixed-precision bf16 ...
    accelerate launch m3d/train/train_detector.py --model runs/unet/best --data m3dsynth ...   # continue from weights
    # from Python:
    train(TrainDetectorArguments(detector="unet", preset="tiny", data="m3dsynth", output_dir="runs/unet"))

Data (`m3d.train.detector_data`): ``--data DIR`` is an M3Dsynth folder (``datasets.load_dataset(DIR)``),
restricted to ``--generators`` (their fakes + every pristine scan) and ``--tasks``. Every epoch each
training scan gets a random crop around its site (``--crop-size Z,Y,X`` voxels, or ``full``) and the
epoch's slices are drawn half tampered, half pristine. ``--train-images DIR`` trains instead on an
``imagefolder`` of real/fake pictures (class folders named real|pristine|authentic and
fake|manipulated|tampered|synthetic), random ``Y x X`` patches, detection loss only.

Loss: the detector's own (``model(pixel_values, labels, masks).loss``: BCE on the slice label and its
localization loss on the mask slice). AdamW, a transformers LR schedule, Accelerate for devices,
processes, ``--mixed-precision`` and ``--gradient-accumulation-steps``.

Each epoch ends with validation on the ``--validation-split`` (`m3d.train.evaluation.evaluate_detector`:
fixed test crops, volume score = max over slices, AUC / balanced accuracy / Pd@1 %, F1 / IoU of the 3-D
maps), sharded over the processes. Outputs in ``OUTPUT_DIR``: ``best/`` (`save_pretrained` of the best
validation ``--metric-for-best-model``; the last model without validation) with ``validation.json``,
``preprocessor_config.json`` (its `M3DCTImageProcessor`) and a model card,
``checkpoints/checkpoint_<n>/`` (`Accelerator.save_state` at each epoch end, every
``--checkpointing-steps`` and on Ctrl-C / SIGTERM; ``--resume-from-checkpoint latest|PATH`` continues
exactly), ``logs.jsonl`` (training losses and validation metrics), ``tensorboard/`` and
``training_summary.json``. At the end the kept model's ``volume_threshold`` (the volume score above which
a scan is called manipulated) is set on the ``--calibration-split``'s fixed crops to the threshold of
best balanced accuracy (`m3d.metrics.balanced_threshold`), recorded in ``training_summary.json``: a slice
classifier's 0.5 is not the right cut for the max over a crop's slices. ``--push-to-hub`` uploads
``best/`` with huggingface_hub.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from m3d.errors import run_guarded
from m3d.files import write_json_atomic
from m3d.constants import GENERATORS, TASKS
from m3d.detectors import DETECTORS, M3DDetectorConfig, load_detector, register_bayar_constraint
from m3d.detectors.image_processing_m3d import M3DCTImageProcessor
from m3d.detectors.modeling_utils import INPUT_MODES
from m3d.metrics import balanced_accuracy, balanced_threshold, tied_pair_fraction
from m3d.train.common import (
    MIXED_PRECISION,
    dealt,
    finite_or_none,
    gather_dealt,
    json_value,
    optimizer_micro_step,
    save_pretrained_atomic,
)
from m3d.train.detector_data import (
    DEFAULT_CROP_SIZE,
    CropSize,
    TrainingSlices,
    evaluation_crops,
    filter_examples,
    load_split,
    parse_crop_size,
)
from m3d.train.evaluation import DETECTION_KEYS, LOCALIZATION_KEYS, predict_samples, summarize
from m3d.train.loop import TrainingArguments, TrainingLoop

PRESET_CHOICES = ("tiny", "default")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
BEST_METRICS = (*DETECTION_KEYS, *LOCALIZATION_KEYS)
REAL_NAMES = ("real", "pristine", "authentic", "0")
FAKE_NAMES = ("fake", "manipulated", "tampered", "synthetic", "1")
BEST_FOLDER = "best"

logger = logging.getLogger("m3d.train.train_detector")


# -- models -------------------------------------------------------------------------------------


def detector_config(name: str, preset: str = "default", **overrides: Any) -> M3DDetectorConfig:
    """The config of detector ``name`` at a size preset of its config class (``tiny``: a few thousand
    parameters, for tests and the CPU demo; ``default``: the papers' sizes), with overrides."""
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; choose from {', '.join(DETECTORS)}")
    return DETECTORS[name][0].from_preset(preset, **overrides)


def build_detector(
    name: str | None = None, preset: str = "default", model_path: str | None = None, seed: int = 0, **overrides
):
    """A new detector (``name`` + ``preset``, weights initialised from ``seed``) or one loaded from
    ``model_path`` (a `save_pretrained` folder)."""
    if model_path is not None:
        return load_detector(model_path, **overrides)
    torch.manual_seed(seed)
    return DETECTORS[name][1](detector_config(name, preset, **overrides))


def detector_name(model) -> str:
    """The `DETECTORS` name of a model instance."""
    return next((name for name, (_, cls) in DETECTORS.items() if isinstance(model, cls)), type(model).__name__)


# -- non-medical images -------------------------------------------------------------------------


class ImagePatches(torch.utils.data.Dataset):
    """Random ``size`` patches of an ``imagefolder`` of real/fake images, as 3-channel [-1, 1] inputs
    (smaller images are resized up); patch positions are drawn from ``(seed, epoch, index)``."""

    def __init__(
        self, folder: str | Path, size: tuple[int, int], seed: int = 0, multiple: int = 1, cache_dir: str | None = None
    ):
        import datasets

        if not Path(folder).is_dir():
            raise FileNotFoundError(f"{folder} is not an image folder")
        self.images = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train", cache_dir=cache_dir)
        names = [n.lower() for n in self.images.features["label"].names]
        unknown = [n for n in names if n not in REAL_NAMES + FAKE_NAMES]
        if unknown:
            raise ValueError(f"{folder}: class folders must be named {REAL_NAMES} or {FAKE_NAMES}; got {unknown}")
        self.is_fake = np.array([n in FAKE_NAMES for n in names])
        self.size, self.seed, self.epoch = size, seed, 0
        self.samples_per_epoch = -(-max(len(self.images), multiple) // multiple) * multiple

    def __len__(self) -> int:
        return self.samples_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        from PIL import Image

        rng = np.random.default_rng([self.seed, self.epoch, index, 0x1A])
        example = self.images[int(rng.permutation(len(self.images))[0]) if index >= len(self.images) else index]
        image = example["image"].convert("RGB")
        height, width = self.size
        if image.height < height or image.width < width:
            scale = max(height / image.height, width / image.width)
            image = image.resize((math.ceil(image.width * scale), math.ceil(image.height * scale)), Image.BILINEAR)
        top = int(rng.integers(0, image.height - height + 1))
        left = int(rng.integers(0, image.width - width + 1))
        pixels = np.asarray(image.crop((left, top, left + width, top + height)), np.float32) / 127.5 - 1
        label = float(self.is_fake[example["label"]])
        return {"pixel_values": torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), "labels": torch.tensor(label)}


# -- arguments ----------------------------------------------------------------------------------


@dataclass(kw_only=True)
class TrainDetectorArguments(TrainingArguments):
    """`m3d train-detector`'s options (`build_parser` describes each); one of ``detector`` and ``model``."""

    detector: str | None = None
    model: str | None = None
    preset: str = "default"
    input_mode: str | None = None
    data: str | None = None
    train_images: str | None = None
    generators: list[str] | None = None
    tasks: list[str] | None = None
    train_split: str = "train"
    validation_split: str = "validation"
    calibration_split: str = "auto"
    crop_size: CropSize = DEFAULT_CROP_SIZE
    slices_per_epoch: int | None = None
    cache_mb: int = 4096
    dataset_cache_dir: str | None = None
    num_epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 16
    eval_batch_size: int = 32
    learning_rate: float = 1e-4
    weight_decay: float = 1e-4
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    metric_for_best_model: str = "auc"
    checkpointing_steps: int = 0
    checkpoints_total_limit: int | None = 2
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private: bool = False

    def check(self) -> None:
        """ValueError for values the parser lets through."""
        if (self.detector is None) == (self.model is None):
            raise ValueError("give one of --detector (a new detector) and --model (a saved one)")
        self.require_positive(
            "num_epochs",
            "batch_size",
            "eval_batch_size",
            "gradient_accumulation_steps",
            "log_every",
            "cache_mb",
            optional=("max_steps", "slices_per_epoch"),
        )
        if self.checkpointing_steps < 0 or self.num_workers < 0 or self.warmup_steps < 0:
            raise ValueError("--checkpointing-steps, --num-workers and --warmup-steps must not be negative")
        if self.data is None and self.train_images is None:
            raise ValueError("give --data (an M3Dsynth folder) or --train-images (an image folder)")
        if self.train_images is not None and self.crop_size is None:
            raise ValueError("--train-images needs an explicit --crop-size (its Y, X are the patch size)")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m m3d.train.train_detector",
        description="Fine-tune an m3d forensic detector on M3Dsynth slices (balanced tampered / pristine) with "
        "validation each epoch; saves OUTPUT_DIR/best with save_pretrained. Runs under `accelerate launch` too.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    what = parser.add_argument_group("what to train (--detector or --model)")
    source = what.add_mutually_exclusive_group(required=True)
    source.add_argument("--detector", choices=list(DETECTORS), help="a new detector of this architecture")
    source.add_argument("--model", metavar="PATH", help="start from a saved detector (save_pretrained folder)")
    what.add_argument(
        "--preset",
        choices=PRESET_CHOICES,
        help="size of a new detector: tiny (tests, CPU demo) or default (the papers')",
    )
    what.add_argument(
        "--input-mode",
        choices=[mode for mode in INPUT_MODES if mode != "slab"],
        help="how HU become the 3-channel input of a new 2-D detector (default: the config's hu_windows; "
        "slab3d always reads slabs of slices)",
    )

    data = parser.add_argument_group("data")
    data.add_argument(
        "--data", metavar="DIR", help="M3Dsynth folder (datasets.load_dataset); needed unless --train-images"
    )
    data.add_argument(
        "--train-images",
        metavar="DIR",
        help="train on this imagefolder of real/fake images instead of M3Dsynth (--data then only validates)",
    )
    data.add_argument(
        "--generators",
        nargs="+",
        choices=[g for g in GENERATORS if g != "real"],
        help="keep these generators' fakes (pristine scans always kept); default all",
    )
    data.add_argument("--tasks", nargs="+", choices=TASKS, help="keep these tasks; default both")
    data.add_argument("--train-split", help="the split to train on")
    data.add_argument("--validation-split", help="'none' to skip validation")
    data.add_argument(
        "--calibration-split",
        help="scans whose crops set the saved model's volume_threshold (best balanced accuracy of the "
        "volume score): 'auto' = the validation split when validating, else the training split; "
        "'none' keeps the model's threshold",
    )
    data.add_argument(
        "--crop-size",
        type=parse_crop_size,
        metavar="Z,Y,X|full",
        help="crop around the site in voxels (Y, X multiples of 32), or 'full' for whole scans",
    )
    data.add_argument(
        "--slices-per-epoch",
        type=int,
        help="training slices per epoch (default: twice the tampered slices of the training crops)",
    )
    data.add_argument("--cache-mb", type=int, help="memory for decoded crops (least recently used dropped)")
    data.add_argument("--dataset-cache-dir", help="datasets' cache folder (default: HF_DATASETS_CACHE)")

    run = parser.add_argument_group("training")
    run.add_argument(
        "--output-dir", required=True, metavar="DIR", help="best/, checkpoints/, logs and the summary go here"
    )
    run.add_argument("--num-epochs", type=int, help="passes over the training slices (see --max-steps)")
    run.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (smoke runs)")
    run.add_argument("--batch-size", type=int, help="slices per process and micro-batch")
    run.add_argument("--eval-batch-size", type=int, help="slices per forward pass in validation")
    run.add_argument("--learning-rate", type=float, help="AdamW peak learning rate")
    run.add_argument("--weight-decay", type=float, help="AdamW weight decay")
    run.add_argument("--lr-scheduler", choices=SCHEDULERS, help="transformers learning-rate schedule")
    run.add_argument("--warmup-steps", type=int, help="linear warm-up steps of the schedule")
    run.add_argument("--max-grad-norm", type=float, help="clip gradient norms (0: off)")
    run.add_argument("--gradient-accumulation-steps", type=int, help="micro-batches per optimizer step")
    run.add_argument(
        "--mixed-precision",
        choices=MIXED_PRECISION,
        help="Accelerate mixed precision of the forward passes (bf16 on recent GPUs)",
    )
    run.add_argument(
        "--metric-for-best-model",
        choices=BEST_METRICS,
        help="validation metric (all generators, all tasks) that picks best/; higher is better",
    )
    run.add_argument("--seed", type=int, help="seed of the weights, the crops and the slice order")
    run.add_argument("--num-workers", type=int, help="DataLoader worker processes")
    run.add_argument("--cpu", action="store_true", help="train on the CPU even when an accelerator is present")

    save = parser.add_argument_group("checkpoints, logs, Hub")
    save.add_argument(
        "--checkpointing-steps",
        type=int,
        help="also checkpoint every N steps (checkpoints are always written at epoch ends and on interrupt)",
    )
    save.add_argument("--checkpoints-total-limit", type=int, help="checkpoints kept (the oldest deleted)")
    save.add_argument(
        "--resume-from-checkpoint",
        metavar="latest|PATH",
        help="continue from the newest checkpoint in --output-dir, or from PATH",
    )
    save.add_argument("--log-every", type=int, help="write mean losses to logs.jsonl every N steps")
    save.add_argument("--no-progress", action="store_true", help="no progress bars")
    save.add_argument("--push-to-hub", action="store_true", help="upload best/ to the Hub at the end")
    save.add_argument("--hub-model-id", help="repository id (default: the output folder's name)")
    save.add_argument("--hub-private", action="store_true", help="create the Hub repository private")
    parser.set_defaults(**TrainDetectorArguments.defaults())
    return parser


def parse_arguments(argv: Sequence[str] | None = None, prog: str | None = None) -> TrainDetectorArguments:
    """The command line ``argv`` (None: ``sys.argv``) as `TrainDetectorArguments`."""
    return TrainDetectorArguments.parse(build_parser(prog), argv)


# -- helpers ------------------------------------------------------------------------------------


def _validation_file(entry: dict[str, Any]) -> dict[str, str]:
    """``validation.json`` (the validation ``entry``, non-finite values as null) for `save_pretrained_atomic`."""
    return {"validation.json": json.dumps(finite_or_none(entry), indent=2, sort_keys=True)}


def calibration_split_name(args: TrainDetectorArguments) -> str | None:
    """The split that calibrates ``volume_threshold`` (None: keep the model's)."""
    chosen = args.calibration_split.lower()
    if chosen == "none" or args.data is None or (chosen == "auto" and args.train_images):
        return None
    if chosen != "auto":
        return args.calibration_split
    return args.validation_split if args.validation_split.lower() != "none" else args.train_split


# more (fake, pristine) pairs of the calibration scans than this with the same score: the output has saturated
MAX_TIED_PAIR_FRACTION = 0.02


def calibrate_volume_threshold(model, crops, batch_size: int = 32, progress: bool = False) -> dict[str, Any]:
    """Set ``model.config.volume_threshold`` to the best-balanced-accuracy threshold of its volume scores
    on ``crops`` (kept when they lack fakes or pristine scans); returns what was measured."""
    records, _ = predict_samples(model, crops, batch_size=batch_size, progress=progress)
    labels = np.array([r["label"] == "fake" for r in records], dtype=int)
    scores = np.array([r["score"] for r in records])
    result: dict[str, Any] = {
        "n_fake": int(labels.sum()),
        "n_pristine": int(len(labels) - labels.sum()),
        "threshold_before": model.config.volume_threshold,
    }
    if 0 < labels.sum() < len(labels):
        model.config.volume_threshold = balanced_threshold(labels, scores)
        result["balanced_accuracy_before"] = balanced_accuracy(labels, scores, result["threshold_before"])
        result["tied_pair_fraction"] = tied_pair_fraction(labels, scores)
    result["threshold"] = model.config.volume_threshold
    result["balanced_accuracy"] = (
        balanced_accuracy(labels, scores, model.config.volume_threshold) if 0 < labels.sum() < len(labels) else None
    )
    return result


# -- training -----------------------------------------------------------------------------------


class DetectorTraining(TrainingLoop):
    """A detector's run: balanced training slices (or image patches), AdamW on a transformers schedule,
    validation and a checkpoint at each epoch end, the best model kept and its volume threshold calibrated."""

    arguments: TrainDetectorArguments
    name = "train_detector"
    unit = "slices"

    def __init__(self, arguments: TrainDetectorArguments, dataset=None) -> None:
        from transformers import get_scheduler

        if dataset is not None:
            arguments = replace(arguments, data=arguments.data or "<in-memory dataset>")
        arguments.check()
        super().__init__(arguments, logger)
        args, accelerator = arguments, self.accelerator
        overrides = {"input_mode": args.input_mode} if args.input_mode and not args.model else {}
        model = build_detector(args.detector, args.preset, args.model, seed=args.seed, **overrides)
        self.detector_name = detector_name(model)
        self.description = f"train {self.detector_name}"
        self.source = dataset if dataset is not None else args.data
        self.cache_bytes = args.cache_mb << 20

        if args.train_images:
            train_set = ImagePatches(
                args.train_images,
                tuple(args.crop_size[1:]),
                seed=args.seed,
                multiple=self.total_batch,
                cache_dir=args.dataset_cache_dir,
            )
            described = f"{len(train_set.images)} images of {args.train_images}"
        else:
            split = self.split(args.train_split)
            train_set = TrainingSlices(
                split,
                args.crop_size,
                model.config,
                seed=args.seed,
                samples_per_epoch=args.slices_per_epoch,
                multiple=self.total_batch,
                max_cache_bytes=self.cache_bytes,
                progress=self.show_progress,
            )
            described = f"{len(split)} scans of {args.data}"
        logger.info(
            "%s (%s preset=%s): %s -> %d slices per epoch",
            self.detector_name,
            "loaded" if args.model else "new",
            args.preset,
            described,
            len(train_set),
        )

        self.validation = None
        if args.validation_split.lower() != "none" and args.data is not None:
            self.validation = evaluation_crops(
                self.split(args.validation_split), args.crop_size, model.config, self.cache_bytes
            )

        loader = torch.utils.data.DataLoader(
            train_set,
            batch_size=args.batch_size,
            shuffle=False,
            drop_last=True,
            num_workers=args.num_workers,
            pin_memory=accelerator.device.type == "cuda",
        )
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
        register_bayar_constraint(optimizer, model)
        steps_per_epoch = len(train_set) // self.total_batch
        self.total_steps = int(min(args.max_steps or math.inf, args.num_epochs * steps_per_epoch))
        scheduler = get_scheduler(
            args.lr_scheduler,
            optimizer,
            num_warmup_steps=args.warmup_steps * accelerator.num_processes,
            num_training_steps=self.total_steps * accelerator.num_processes,
        )
        self.model, self.optimizer, self.loader, self.scheduler = accelerator.prepare(
            model, optimizer, loader, scheduler
        )
        self.best: dict[str, Any] = {"value": None, "step": None, "epoch": None}
        self.history: list[dict[str, Any]] = []
        self.validated_at = -1  # the step of the last validation
        self.best_dir = self.output_dir / BEST_FOLDER
        self.model.train()

    def split(self, name: str):
        """Split ``name`` of the data, restricted to ``--generators`` and ``--tasks``."""
        args = self.arguments
        return filter_examples(load_split(self.source, name, args.dataset_cache_dir), args.generators, args.tasks)

    def micro_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        loss = optimizer_micro_step(
            self.accelerator, self.model, batch, self.optimizer, self.scheduler, self.arguments.max_grad_norm
        )
        return {"loss": loss}

    def training_record(
        self, epoch: int, losses: dict[str, float], steps_per_s: float, elapsed_s: float
    ) -> dict[str, Any]:
        return {
            "step": self.global_step,
            "epoch": epoch,
            **losses,
            "lr": self.scheduler.get_last_lr()[0],
            "elapsed_s": elapsed_s,
        }

    def tracker_values(self, record: dict[str, Any]) -> dict[str, Any]:
        return {"train/loss": record["loss"], "train/lr": record["lr"]}

    def on_epoch_end(self, epoch: int) -> None:
        self.validate(epoch)
        if self.global_step != self.last_saved:
            self.save_checkpoint()

    def on_train_end(self) -> None:
        if self.validated_at != self.global_step:
            self.validate(max(self.micro - 1, 0) // self.micro_per_epoch)
        if self.global_step != self.last_saved:
            self.save_checkpoint()

    def validate(self, epoch: int) -> None:
        """Score the validation crops (sharded over the processes), log the metrics and keep the model in
        ``best/`` when ``--metric-for-best-model`` improved."""
        args, accelerator, step = self.arguments, self.accelerator, self.global_step
        self.validated_at = step
        if self.validation is None:
            return
        unwrapped = accelerator.unwrap_model(self.model)
        mine = dealt(len(self.validation), accelerator.process_index, accelerator.num_processes)
        with accelerator.autocast():
            records, _ = predict_samples(
                unwrapped, self.validation, mine, batch_size=args.eval_batch_size, progress=self.show_progress
            )
        records = gather_dealt(records, len(self.validation), accelerator.num_processes)
        metrics = summarize(records, unwrapped.config.volume_threshold)["all"]["all"]
        entry = {"step": step, "epoch": epoch, **{f"val/{k}": v for k, v in metrics.items()}}
        self.history.append(finite_or_none(entry))
        value = metrics.get(args.metric_for_best_model)
        improved = (
            value is not None and math.isfinite(value) and (self.best["value"] is None or value > self.best["value"])
        )
        if improved:
            self.best.update(value=float(value), step=step, epoch=epoch)
        self.log(entry, {k: v for k, v in entry.items() if k.startswith("val/")})
        if self.main_process and improved:
            save_pretrained_atomic(
                unwrapped, self.best_dir, _validation_file({"metric": args.metric_for_best_model, **entry})
            )
            M3DCTImageProcessor.from_detector_config(unwrapped.config).save_pretrained(self.best_dir)
        shown = ", ".join(f"{k} {metrics[k]:.3f}" for k in ("auc", "pd_at_1pct", "f1") if metrics.get(k) is not None)
        logger.info(
            "validation at step %d (epoch %d): %s%s", step, epoch, shown or "undefined", " (best)" if improved else ""
        )

    def checkpoint_extras(self, folder: Path) -> dict[str, Any]:
        return {
            "detector": self.detector_name,
            "preset": self.arguments.preset,
            "best": self.best,
            "history": finite_or_none(self.history),
        }

    def resume_from(self, state: dict[str, Any], folder: Path) -> None:
        if state.get("detector") != self.detector_name:
            raise ValueError(
                f"checkpoint {folder} holds a {state.get('detector')} detector; this run builds {self.detector_name}"
            )
        self.best, self.history = state["best"], state.get("history", [])
        self.validated_at = self.history[-1]["step"] if self.history else -1

    def save_outputs(self) -> None:
        args, accelerator, name, best_dir = self.arguments, self.accelerator, self.detector_name, self.best_dir
        if self.best["value"] is None:  # no (defined) validation: the last model is the one kept
            unwrapped = accelerator.unwrap_model(self.model)
            save_pretrained_atomic(unwrapped, best_dir, _validation_file(self.history[-1] if self.history else {}))
            M3DCTImageProcessor.from_detector_config(unwrapped.config).save_pretrained(best_dir)
        calibration = None
        calibration_split = calibration_split_name(args)
        if calibration_split is not None:
            kept = build_detector(model_path=str(best_dir)).to(accelerator.device)
            crops = evaluation_crops(self.split(calibration_split), args.crop_size, kept.config, self.cache_bytes)
            calibration = {
                "split": calibration_split,
                **calibrate_volume_threshold(kept, crops, args.eval_batch_size, self.show_progress),
            }
            write_json_atomic(
                best_dir / "config.json", json.loads(kept.config.to_json_string())
            )  # as save_pretrained: no local path
            logger.info(
                "volume_threshold %.4f from the %s split (%d fakes, %d pristine): balanced accuracy %s",
                calibration["threshold"],
                calibration_split,
                calibration["n_fake"],
                calibration["n_pristine"],
                calibration["balanced_accuracy"],
            )
            if calibration["balanced_accuracy"] is not None and calibration["balanced_accuracy"] <= 0.5:
                logger.warning(
                    "the volume scores do not separate the %s split's fakes from its pristine scans: the detection "
                    "output has collapsed (try a lower --learning-rate)",
                    calibration_split,
                )
            if calibration.get("tied_pair_fraction", 0) > MAX_TIED_PAIR_FRACTION:
                logger.warning(
                    "%.0f%% of the %s split's (fake, pristine) pairs have the same volume score: the detection "
                    "output has saturated, which caps its AUC at %.2f",
                    100 * calibration["tied_pair_fraction"],
                    calibration_split,
                    1 - calibration["tied_pair_fraction"] / 2,
                )
        _write_card(best_dir, name, args)
        summary = {
            "detector": name,
            "preset": args.preset,
            "steps": self.global_step,
            "best": self.best,
            "history": self.history,
            "calibration": calibration,
            "wall_s": round(time.perf_counter() - self.start_time, 3),
            "args": {k: json_value(v) for k, v in asdict(args).items()},
        }
        write_json_atomic(self.output_dir / "training_summary.json", finite_or_none(summary))
        logger.info(
            "saved %s to %s (best %s: %s at step %s)",
            name,
            best_dir,
            args.metric_for_best_model,
            self.best["value"],
            self.best["step"],
        )
        if args.push_to_hub:
            from m3d.hub import push_folder

            url = push_folder(best_dir, args.hub_model_id or self.output_dir.name, private=args.hub_private)
            logger.info("pushed %s to %s", best_dir, url)


def train(arguments: TrainDetectorArguments, dataset=None) -> int:
    """Train a detector as ``arguments`` say (``dataset``, a `DatasetDict`, replaces ``--data``): 0 done,
    130 stopped (a checkpoint saved); bad input raises."""
    training = DetectorTraining(arguments, dataset)
    return training.run(training.loader, training.total_steps)


def _write_card(folder: Path, name: str, args: TrainDetectorArguments) -> None:
    from m3d.model_cards import write_model_card

    data = f"images {args.train_images}" if args.train_images else f"M3Dsynth {args.data}"
    scope = f"generators {', '.join(args.generators or ['all'])}, tasks {', '.join(args.tasks or ['all'])}"
    crop = "full scans" if args.crop_size is None else "crops " + "x".join(map(str, args.crop_size))
    write_model_card(
        folder, name=f"m3d-{name}", provenance=f"Trained with `m3d train-detector` on {data} ({scope}; {crop})."
    )


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Entry point (`m3d train-detector` calls it): 0 done, 2 bad input, 130 interrupted (checkpoint saved)."""
    arguments = parse_arguments(argv, prog)
    return run_guarded("train_detector", lambda: train(arguments), (ValueError, FileNotFoundError, NotADirectoryError))


if __name__ == "__main__":
    sys.exit(main())
