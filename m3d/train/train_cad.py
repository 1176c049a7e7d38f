"""Train the CAD malignancy scorer (`m3d.cad.CADForMalignancyScoring`) on LIDC nodules.

    python -m m3d.train.train_cad --phantoms 24 --output-dir runs/cad
    accelerate launch -m m3d.train.train_cad --lidc-root /data/LIDC-IDRI --output-dir runs/cad
    train(TrainCADArguments(phantoms=24, output_dir="runs/cad"))  # from Python

Data: ``--lidc-root DIR`` (a LIDC-IDRI download), ``--data DIR`` (cases in the `m3d phantom` layout), or
neither: ``--phantoms N`` synthetic scans made in memory, which carry real LIDC nodule contours and
their readers' ratings. Every nodule with a median malignancy rating is a site (`m3d.train.cubes`,
selection ``"cad"``); a (cube_size + 8) mm cube is cut around each and CT-GAN's augmentations (shifts of
up to +-4 voxels, flips, axial quarter turns) are drawn per sample from ``(seed, epoch, index)``.
Targets: malignant (median rating >= 4) vs benign (<= 2) for the BCE; every rated nodule, 3s included,
for the rating regression (`m3d.cad.malignancy_labels`). Sites are split by patient: a seeded
``--validation-fraction`` of the patients is held out and scored on centred cubes every ``--eval-every``
steps and at the end (ROC AUC malignant vs benign, rating MAE).

Optimiser: AdamW (``--learning-rate`` 1e-3, weight decay 1e-4), cosine decay after a 5 % warm-up,
gradient norm clipped at 1. Accelerate runs it (devices, processes, ``--mixed-precision``,
``--gradient-accumulation-steps``). Checkpoints (`Accelerator.save_state`, every ``--checkpointing-steps``,
at the end and on Ctrl-C / SIGTERM) go to ``OUTPUT_DIR/checkpoints/checkpoint_<n>/`` with
``training_state.json`` written last; ``--resume-from-checkpoint latest|PATH`` continues exactly (every
step's randomness is drawn from ``(seed, step)``). Losses and validation metrics go to
``OUTPUT_DIR/logs.jsonl`` (and TensorBoard when installed); the model is saved with ``save_pretrained`` to
``OUTPUT_DIR/model`` and the run described in ``OUTPUT_DIR/training_summary.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..cad.configuration_cad import CADConfig
from ..cad.modeling_cad import IGNORE_INDEX, CADForMalignancyScoring, malignancy_labels
from ..tamper.cube import hu_to_unit
from ..data.phantom import phantom_workers
from ..errors import run_guarded
from ..files import write_json_atomic
from .common import (
    MIXED_PRECISION,
    ignore_sigint,
    json_value,
    optimizer_micro_step,
    save_pretrained_atomic,
)
from .cubes import MAX_SHIFT, CubeDataset
from .loop import TrainingArguments, TrainingLoop

CUT_MARGIN = MAX_SHIFT  # voxels cut beyond the input cube on each side, room for the crop shifts
WARMUP_FRACTION = 0.05
MAX_GRAD_NORM = 1.0

logger = logging.getLogger("m3d.train.train_cad")


class CADCubeDataset(CubeDataset):
    """`CubeDataset` whose items are the scorer's inputs: ``pixel_values`` ``(1, S, S, S)`` in [-1, 1],
    ``labels`` (1 malignant, 0 benign, `IGNORE_INDEX`) and ``ratings`` (median rating) of the site."""

    def __init__(self, *args, config: CADConfig, **kwargs) -> None:
        super().__init__(*args, crop_size=config.cube_size, **kwargs)
        ratings = [r.get("malignancy") for r in self.records]
        self.ratings = np.array([np.nan if r is None else float(r) for r in ratings], np.float32)
        self.labels = malignancy_labels(self.ratings, config)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        cube = self.cube_index(int(index) % len(self))
        return {
            "pixel_values": torch.from_numpy(hu_to_unit(self.crop(index)).astype(np.float32))[None],
            "labels": torch.tensor(self.labels[cube]),
            "ratings": torch.tensor(self.ratings[cube]),
        }


def patient_of(record: dict[str, Any]) -> str:
    """The case id of a site record (``source`` is ``"<case id>/nodule<k>"``)."""
    return record["source"].rsplit("/", 1)[0]


def split_by_patient(records: Sequence[dict[str, Any]], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and validation sites: a seeded ``fraction`` of the patients (at least one
    when ``fraction`` > 0 and there are two or more) is held out with all its nodules."""
    patients = sorted({patient_of(r) for r in records})
    n_val = min(len(patients) - 1, max(1, round(fraction * len(patients)))) if fraction > 0 else 0
    order = np.random.default_rng([seed, 0xCAD]).permutation(len(patients))
    held_out = {patients[i] for i in order[:n_val]}
    is_val = np.array([patient_of(r) in held_out for r in records], bool)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


# -- arguments ----------------------------------------------------------------------------------


@dataclass(kw_only=True)
class TrainCADArguments(TrainingArguments):
    """`m3d train-cad`'s options (`build_parser` describes each)."""

    model: str | None = None
    preset: str = "default"
    data: str | None = None
    lidc_root: str | None = None
    max_scans: int | None = None
    phantoms: int = 24
    phantom_size: int = 128
    phantom_max_slices: int | None = None
    cube_cache: str | None = None
    validation_fraction: float = 0.25
    max_steps: int = 300
    batch_size: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    checkpointing_steps: int = 100
    checkpoints_total_limit: int | None = 3
    eval_every: int = 50

    def check(self) -> None:
        """ValueError for values the parser lets through."""
        self.require_positive(
            "max_steps",
            "batch_size",
            "gradient_accumulation_steps",
            "log_every",
            "phantoms",
            "phantom_size",
            optional=("max_scans",),
        )
        if min(self.checkpointing_steps, self.eval_every, self.num_workers) < 0:
            raise ValueError("--checkpointing-steps, --eval-every and --num-workers must not be negative")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError("--checkpoints-total-limit must be positive")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"--validation-fraction must be in [0, 1); got {self.validation_fraction}")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m m3d.train.train_cad",
        description="Train the CAD malignancy scorer (3-D CNN on 1 mm nodule cubes) on LIDC nodules rated by the "
        "readers; saves a transformers model folder (OUTPUT_DIR/model). Runs under `accelerate launch` too.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model",
        metavar="DIR",
        help="start from a saved CAD scorer (save_pretrained folder) instead of a new --preset model",
    )
    parser.add_argument(
        "--preset",
        choices=tuple(CADConfig.presets),
        help="network size (CADConfig.presets; tiny: tests; default: 48 mm cubes, widths 16-128)",
    )

    data = parser.add_argument_group("data (one of --data / --lidc-root; else --phantoms synthetic scans)")
    source = data.add_mutually_exclusive_group()
    source.add_argument(
        "--data", metavar="DIR", help="folder of LIDC-style cases: <case>/dicom/ + LIDC XML (m3d phantom's layout)"
    )
    source.add_argument("--lidc-root", metavar="DIR", help="a LIDC-IDRI download: DICOM series folders with their XML")
    data.add_argument("--max-scans", type=int, metavar="N", help="read at most N scans of --data / --lidc-root")
    data.add_argument(
        "--phantoms", type=int, metavar="N", help="synthetic scans made in memory when no data folder is given"
    )
    data.add_argument("--phantom-size", type=int, help="in-plane matrix of the synthetic scans")
    data.add_argument("--phantom-max-slices", type=int, help="cap on the synthetic scans' slices")
    data.add_argument(
        "--cube-cache", metavar="DIR", help="keep the cut cubes here (an .npz per data source) and reuse them"
    )
    data.add_argument("--validation-fraction", type=float, help="fraction of the patients held out for validation")

    run = parser.add_argument_group("training")
    run.add_argument("--output-dir", required=True, metavar="DIR", help="checkpoints, logs.jsonl and model/ go here")
    run.add_argument("--max-steps", type=int, help="optimizer steps in all (a resumed run counts on)")
    run.add_argument("--batch-size", type=int, help="cubes per process and micro-batch")
    run.add_argument("--learning-rate", type=float, help="AdamW peak rate (5%% warm-up, cosine decay)")
    run.add_argument("--weight-decay", type=float, help="AdamW weight decay")
    run.add_argument("--gradient-accumulation-steps", type=int, help="micro-batches per optimizer step")
    run.add_argument(
        "--mixed-precision",
        choices=MIXED_PRECISION,
        help="Accelerate mixed precision of the forward passes (bf16 on recent GPUs)",
    )
    run.add_argument(
        "--seed", type=int, help="seeds the data, the split, the augmentations and every step's randomness"
    )
    run.add_argument("--num-workers", type=int, help="DataLoader worker processes")
    run.add_argument("--cpu", action="store_true", help="train on the CPU even when an accelerator is present")

    save = parser.add_argument_group("checkpoints, validation and logs")
    save.add_argument(
        "--checkpointing-steps", type=int, help="save a checkpoint every N steps and at the end (0: only on interrupt)"
    )
    save.add_argument("--checkpoints-total-limit", type=int, help="keep at most this many checkpoints")
    save.add_argument(
        "--resume-from-checkpoint",
        metavar="latest|PATH",
        help="continue from OUTPUT_DIR's newest complete checkpoint (latest; a fresh start if none) or a folder",
    )
    save.add_argument("--eval-every", type=int, help="validate every N steps (and at the end; 0: only at the end)")
    save.add_argument("--log-every", type=int, help="write mean losses to logs.jsonl every N steps")
    save.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(**TrainCADArguments.defaults())
    return parser


def parse_arguments(argv: Sequence[str] | None = None, prog: str | None = None) -> TrainCADArguments:
    """The command line ``argv`` (None: ``sys.argv``) as `TrainCADArguments`."""
    return TrainCADArguments.parse(build_parser(prog), argv)


# -- data ---------------------------------------------------------------------------------------


def _data_key(args: TrainCADArguments, cut_size: int) -> dict[str, Any]:
    """What the cut cubes depend on (the cube cache's key)."""
    from . import cubes

    key: dict[str, Any] = {"selection": "cad", "cut_size": cut_size, "version": 1}
    if args.data or args.lidc_root:
        root = Path(args.data or args.lidc_root).resolve()
        key.update(
            kind="data" if args.data else "lidc_root",
            root=str(root),
            max_scans=args.max_scans,
            entries=sorted(p.name for p in root.iterdir()) if root.is_dir() else [],
        )
    else:
        key.update(
            kind="phantoms",
            n=args.phantoms,
            seed=args.seed,
            size=args.phantom_size,
            max_slices=args.phantom_max_slices,
            nodules=repr(cubes.PHANTOM_NODULES["cad"]),
        )
    return key


def load_cubes(
    args: TrainCADArguments, cut_size: int, progress: bool, workers: int = 1
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """HU cubes (``(N, cut, cut, cut)``) and site records of every rated nodule of the data source;
    ``workers`` processes make phantoms."""
    from .cubes import iter_case_folders, iter_lidc_root, iter_phantom_cases

    cache = None
    if args.cube_cache:
        digest = hashlib.sha1(json.dumps(_data_key(args, cut_size), sort_keys=True).encode()).hexdigest()[:16]
        cache = Path(args.cube_cache) / f"cubes_cad_{digest}.npz"
        if cache.is_file():
            with np.load(cache, allow_pickle=False) as stored:
                logger.info("cubes from the cache %s", cache)
                return stored["cubes_hu"], json.loads(str(stored["records"]))
    if args.data:
        cases = iter_case_folders(args.data)
    elif args.lidc_root:
        cases = iter_lidc_root(args.lidc_root)
    else:
        cases = iter_phantom_cases(
            args.phantoms,
            seed=args.seed,
            size=args.phantom_size,
            max_slices=args.phantom_max_slices,
            task="cad",
            workers=workers,
        )
    if args.max_scans is not None and (args.data or args.lidc_root):
        cases = itertools.islice(cases, args.max_scans)
    dataset = CubeDataset.from_cases(cases, "cad", progress=progress, cut_size=cut_size, crop_size=cut_size)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.stem}.tmp-{os.getpid()}.npz")
        np.savez(tmp, cubes_hu=dataset.cubes_hu, records=np.array(json.dumps(dataset.records)))
        os.replace(tmp, cache)
    return dataset.cubes_hu, dataset.records


def _class_counts(labels: np.ndarray) -> dict[str, int]:
    return {
        "benign": int((labels == 0).sum()),
        "malignant": int((labels == 1).sum()),
        "unlabelled": int((labels == IGNORE_INDEX).sum()),
    }


# -- validation ---------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: CADForMalignancyScoring, dataset: CADCubeDataset, batch_size: int, device: torch.device
) -> dict[str, float]:
    """Centred-cube scores of ``dataset`` (no augmentation): ``val_auc`` (malignant vs benign; NaN
    unless both occur), ``val_loss`` and ``val_rating_mae`` (NaN without the rating head)."""
    from ..metrics.detection import roc_auc

    was_training = model.training
    model.eval()
    logits, ratings, losses = [], [], []
    try:
        for start in range(0, len(dataset.cubes_hu), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset.cubes_hu)))]
            batch = {k: torch.stack([item[k] for item in items]).to(device) for k in items[0]}
            output = model(**batch)
            logits.append(output.logits.float().cpu())
            if output.rating is not None:
                ratings.append(output.rating.float().cpu())
            if output.loss is not None:
                losses.append(float(output.loss) * len(items))
    finally:
        model.train(was_training)
    scores = torch.cat(logits).numpy()
    labelled = dataset.labels != IGNORE_INDEX
    labels = dataset.labels[labelled]
    auc = roc_auc(labels, scores[labelled]) if len(np.unique(labels)) == 2 else float("nan")
    mae = float("nan")
    if ratings:
        rated = np.isfinite(dataset.ratings)
        mae = float(np.abs(torch.cat(ratings).numpy()[rated] - dataset.ratings[rated]).mean())
    return {
        "val_auc": float(auc),
        "val_loss": sum(losses) / len(scores) if losses else float("nan"),
        "val_rating_mae": mae,
    }


# -- training -----------------------------------------------------------------------------------


class CADTraining(TrainingLoop):
    """A CAD scorer's run: the rated nodules' cubes split by patient, AdamW on a cosine schedule, validation
    every ``--eval-every`` steps and at the end."""

    arguments: TrainCADArguments
    name = "train_cad"
    unit = "cubes"

    def __init__(self, arguments: TrainCADArguments) -> None:
        from transformers import get_cosine_schedule_with_warmup

        arguments.check()
        super().__init__(arguments, logger)
        args, accelerator = arguments, self.accelerator
        self.description = "cad"
        if args.model is not None and not (Path(args.model) / "config.json").is_file():
            raise FileNotFoundError(f"--model {args.model} is not a saved CAD scorer (no config.json)")
        config = CADConfig.from_pretrained(args.model) if args.model else CADConfig.from_preset(args.preset)

        # data: every process cuts the same cubes (deterministic); the loader shards the batches
        cut_size = config.cube_size + 2 * CUT_MARGIN
        cubes_hu, records = load_cubes(
            args,
            cut_size,
            progress=self.show_progress,
            workers=phantom_workers(args.phantoms, accelerator.num_processes),
        )
        train_idx, val_idx = split_by_patient(records, args.validation_fraction, args.seed)
        if not config.rating_head:  # without the rating head only classification targets train
            keep = malignancy_labels([r["malignancy"] for r in records], config) != IGNORE_INDEX
            train_idx = train_idx[keep[train_idx]]
        if len(train_idx) == 0:
            raise ValueError("no training sites left after the validation split; use more scans")
        samples = math.ceil(max(len(train_idx), self.total_batch) / self.total_batch) * self.total_batch
        train_set = CADCubeDataset(
            cubes_hu=cubes_hu[train_idx],
            records=[records[i] for i in train_idx],
            config=config,
            seed=args.seed,
            augment=True,
            shuffle=True,
            samples_per_epoch=samples,
        )
        self.val_set = (
            CADCubeDataset(
                cubes_hu=cubes_hu[val_idx], records=[records[i] for i in val_idx], config=config, augment=False
            )
            if len(val_idx)
            else None
        )
        self.counts = {
            "train": _class_counts(train_set.labels),
            "validation": _class_counts(self.val_set.labels) if self.val_set else {},
        }
        logger.info(
            "%d rated nodules of %d patients: train %s, validation %s",
            len(records),
            len({patient_of(r) for r in records}),
            self.counts["train"],
            self.counts["validation"] or "none",
        )
        loader = torch.utils.data.DataLoader(
            train_set,
            batch_size=args.batch_size,
            shuffle=False,
            drop_last=True,
            num_workers=args.num_workers,
            worker_init_fn=ignore_sigint if args.num_workers else None,
            pin_memory=accelerator.device.type == "cuda",
        )

        model = CADForMalignancyScoring.from_pretrained(args.model) if args.model else CADForMalignancyScoring(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
        processes = accelerator.num_processes  # the prepared scheduler steps once per process at each optimizer step
        scheduler = get_cosine_schedule_with_warmup(
            optimizer, math.ceil(WARMUP_FRACTION * args.max_steps) * processes, args.max_steps * processes
        )
        self.model, self.optimizer, self.loader, self.scheduler = accelerator.prepare(
            model, optimizer, loader, scheduler
        )
        self.model.train()

    def micro_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            "loss": optimizer_micro_step(
                self.accelerator, self.model, batch, self.optimizer, self.scheduler, MAX_GRAD_NORM
            )
        }

    def training_record(
        self, epoch: int, losses: dict[str, float], steps_per_s: float, elapsed_s: float
    ) -> dict[str, Any]:
        return {
            "step": self.global_step,
            "epoch": epoch,
            **losses,
            "lr": self.scheduler.get_last_lr()[0],
            "steps_per_s": steps_per_s,
            "elapsed_s": elapsed_s,
        }

    def on_step_end(self) -> None:
        eval_every, step = self.arguments.eval_every, self.global_step
        if eval_every and step % eval_every == 0 and step < self.arguments.max_steps:
            self.validate()

    def validate(self) -> dict[str, float]:
        """Score the held-out patients' centred cubes (main process; logged); {} elsewhere or without them."""
        if self.val_set is None or not self.main_process:
            return {}
        metrics = evaluate(
            self.accelerator.unwrap_model(self.model), self.val_set, self.arguments.batch_size, self.accelerator.device
        )
        self.log({"step": self.global_step, **metrics}, metrics)
        logger.info(
            "step %d: validation AUC %.3f, rating MAE %.3f",
            self.global_step,
            metrics["val_auc"],
            metrics["val_rating_mae"],
        )
        return metrics

    def checkpoint_extras(self, folder: Path) -> dict[str, Any]:
        return {"model": "cad", "preset": self.arguments.preset, **self.data_position()}

    def resume_from(self, state: dict[str, Any], folder: Path) -> None:
        if state.get("preset") != self.arguments.preset or state.get("model") != "cad":
            raise ValueError(f"checkpoint {folder} is not a CAD checkpoint of --preset {self.arguments.preset}")

    def save_outputs(self) -> None:
        args = self.arguments
        final = self.validate()
        unwrapped = self.accelerator.unwrap_model(self.model)
        copy = CADForMalignancyScoring(unwrapped.config)
        copy.load_state_dict({k: v.detach().float().cpu() for k, v in unwrapped.state_dict().items()})
        save_pretrained_atomic(copy.eval(), self.output_dir / "model")
        data = "lidc_root" if args.lidc_root else "data" if args.data else "phantom"
        write_json_atomic(
            self.output_dir / "training_summary.json",
            {
                "model": "cad",
                "preset": args.preset,
                "steps": self.global_step,
                "training_data": data,
                "sites": self.counts,
                "validation": {k: v if math.isfinite(v) else None for k, v in final.items()},
                "wall_s": round(time.perf_counter() - self.start_time, 3),
                "args": {k: json_value(v) for k, v in asdict(args).items()},
            },
        )
        logger.info("saved the CAD scorer to %s", self.output_dir / "model")


def train(arguments: TrainCADArguments) -> int:
    """Train the CAD scorer as ``arguments`` say: 0 done, 130 stopped (a checkpoint saved); bad input raises."""
    training = CADTraining(arguments)
    return training.run(training.loader, arguments.max_steps)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Entry point (`m3d train-cad` calls it; ``prog`` names it in the usage line): 0 done, 2 bad input,
    130 interrupted (a checkpoint was saved)."""
    arguments = parse_arguments(argv, prog)
    return run_guarded("train_cad", lambda: train(arguments), (ValueError, FileNotFoundError, NotADirectoryError))


if __name__ == "__main__":
    sys.exit(main())
