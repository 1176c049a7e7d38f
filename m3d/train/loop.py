"""The training loop of the Accelerate trainers (`m3d.train.train_generator`, `m3d.train.train_cad`,
`m3d.train.train_detector`), written once.

`TrainingLoop.run` owns what every trainer does the same way: resuming from a checkpoint (the step counter,
Accelerate's state and the place in the epoch: `Accelerator.skip_first_batches`), the per-micro-batch
seeds (`step_seed`), gradient-accumulation bookkeeping, the log window (mean losses of the processes to
``logs.jsonl``, the trackers and the progress bar), periodic checkpoints (``training_state.json`` written
last), Ctrl-C / SIGTERM (finish the step, checkpoint, 130) and the final checkpoint. A trainer subclasses
it with its data, model and step, and fills in the hooks:

* `micro_step` (required): train on one micro-batch, return its losses by name (``"loss"``, the total that
  the progress bar shows, among them);
* `training_record` (required): the ``logs.jsonl`` record of a log window;
* `tracker_values`: what of that record the trackers get (default: the losses);
* `on_step_end` / `on_epoch_end` / `on_train_end`: validation and the like, after an optimizer step, at
  the end of a complete epoch, after the last step (before the final checkpoint);
* `checkpoint_extras` / `resume_from`: the trainer's keys of ``training_state.json`` (and files beside
  Accelerate's state), and their check and restoration on resume;
* `save_outputs`: the trained model and the run's summary (main process).

Its arguments subclass `TrainingArguments`, the options every trainer has. Kept apart from
`m3d.train.common`, whose light helpers the builder and the benchmark import too.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence, TypeVar

import torch

from ..files import write_json_atomic
from .common import (
    STATE_FILE,
    StopRequest,
    configure_logging,
    dataclass_defaults,
    end_trackers,
    finite_or_none,
    json_value,
    make_accelerator,
    next_checkpoint_number,
    resume_checkpoint,
    step_seed,
)

Arguments = TypeVar("Arguments", bound="TrainingArguments")


@dataclass(kw_only=True)
class TrainingArguments:
    """The options every trainer has (fields = command-line options; a trainer's subclass adds its own and
    sets its defaults). ``max_steps`` None: no limit but the trainer's epochs."""

    output_dir: str
    max_steps: int | None
    batch_size: int
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    seed: int = 0
    num_workers: int = 0
    cpu: bool = False
    checkpointing_steps: int
    checkpoints_total_limit: int | None
    resume_from_checkpoint: str | None = None
    log_every: int = 10
    no_progress: bool = False

    def require_positive(self, *names: str, optional: Sequence[str] = ()) -> None:
        """ValueError naming the option when one of ``names``, or of ``optional`` unless it is None, is below 1
        (the `check` of a trainer's arguments)."""
        for name in (*names, *optional):
            value = getattr(self, name)
            if name in optional and value is None:
                continue
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be positive; got {value}")

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The fields' defaults: the trainer's parser takes them as its own (``parser.set_defaults``)."""
        return dataclass_defaults(cls)

    @classmethod
    def parse(cls: type[Arguments], parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> Arguments:
        """The arguments ``parser`` reads from ``argv`` (None: the command line)."""
        return cls(**vars(parser.parse_args(argv)))


class TrainingLoop:
    """One training run (see the module doc): a subclass's ``__init__`` calls this one first (the
    Accelerator, logging, the global seed), then builds its data and model; `run` trains."""

    name = ""  # the program: the log prefix, the tracker project, the stop message
    unit = "samples"  # what a batch holds, for the resume warning

    def __init__(self, arguments: TrainingArguments, logger: logging.Logger) -> None:
        from accelerate.utils import set_seed

        self.arguments = arguments
        self.logger = logger
        self.output_dir = Path(arguments.output_dir)
        self.accelerator, self.log_with = make_accelerator(arguments, self.output_dir)
        self.main_process = self.accelerator.is_main_process
        self.show_progress = self.main_process and not arguments.no_progress
        self.description = self.name  # the progress bar's
        configure_logging(logger, self.name, self.main_process)
        set_seed(arguments.seed)
        self.total_batch = (
            arguments.batch_size * self.accelerator.num_processes * arguments.gradient_accumulation_steps
        )
        self.global_step = 0  # optimizer steps done
        self.micro = 0  # micro-batches done (of every epoch)
        self.micro_per_epoch = 0
        self.last_saved = -1  # the step of the newest checkpoint
        self.log_path = self.output_dir / "logs.jsonl"
        self.start_time = time.perf_counter()

    # -- hooks --------------------------------------------------------------------------------------

    def micro_step(self, batch: Any) -> dict[str, torch.Tensor]:
        """Train on one micro-batch (under ``accelerator.accumulate``); returns its losses, ``"loss"`` among them."""
        raise NotImplementedError

    def training_record(
        self, epoch: int, losses: dict[str, float], steps_per_s: float, elapsed_s: float
    ) -> dict[str, Any]:
        """The ``logs.jsonl`` record of a log window: ``losses`` are the window's means over the processes."""
        raise NotImplementedError

    def tracker_values(self, record: dict[str, Any]) -> dict[str, Any]:
        """What the trackers get of a `training_record`: its losses."""
        return {k: v for k, v in record.items() if k.startswith("loss")}

    def on_step_end(self) -> None:
        """After each optimizer step and its log, before the periodic checkpoint."""

    def on_epoch_end(self, epoch: int) -> None:
        """After the last step of a complete epoch."""

    def on_train_end(self) -> None:
        """After the last step of a run that was not stopped, before the final checkpoint."""

    def checkpoint_extras(self, folder: Path) -> dict[str, Any]:
        """The trainer's keys of the checkpoint's ``training_state.json`` (main process; files it keeps
        beside Accelerate's state go into ``folder``)."""
        return {}

    def resume_from(self, state: dict[str, Any], folder: Path) -> None:
        """Check that the checkpoint ``folder`` (its ``training_state.json``: ``state``) belongs to this run
        (ValueError otherwise) and restore what `checkpoint_extras` kept; before Accelerate's state loads."""

    def save_outputs(self) -> None:
        """The trained model and the run's summary (main process, after the final checkpoint)."""

    # -- the loop -----------------------------------------------------------------------------------

    def run(self, loader: torch.utils.data.DataLoader, total_steps: int) -> int:
        """Train over the prepared ``loader`` until optimizer step ``total_steps`` (a resumed run counts
        on); returns 0, or 130 when stopped (Ctrl-C / SIGTERM; a checkpoint saved)."""
        from tqdm.auto import tqdm

        accelerator, arguments = self.accelerator, self.arguments
        accumulation = arguments.gradient_accumulation_steps
        self.micro_per_epoch = len(loader)
        if self.micro_per_epoch < accumulation:
            raise ValueError("an epoch holds fewer micro-batches than --gradient-accumulation-steps")
        self._resume()
        if self.log_with:
            accelerator.init_trackers(self.name, config={k: json_value(v) for k, v in asdict(arguments).items()})
        self.start_time = time.perf_counter()
        progress = tqdm(
            total=total_steps,
            initial=min(self.global_step, total_steps),
            desc=self.description,
            unit="step",
            disable=not self.show_progress,
            dynamic_ncols=True,
        )
        sums: dict[str, torch.Tensor] = {}
        count = 0
        self.micro = self.global_step * accumulation
        window_start, window_step = time.perf_counter(), self.global_step
        interrupted = False
        with StopRequest(self.name) as stop:
            try:
                while self.global_step < total_steps and not stop.requested:
                    epoch, skip = divmod(self.micro, self.micro_per_epoch)
                    epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
                    epoch_loader.set_epoch(epoch)
                    for batch in epoch_loader:
                        torch.manual_seed(
                            step_seed(
                                arguments.seed,
                                self.global_step,
                                self.micro % accumulation,
                                accelerator.process_index,
                                accelerator.num_processes,
                            )
                        )
                        losses = self.micro_step(batch)
                        self.micro += 1
                        for key, value in losses.items():
                            sums[key] = sums.get(key, 0.0) + value.detach().float()
                        count += 1
                        if not accelerator.sync_gradients:
                            continue
                        self.global_step += 1
                        progress.update(1)
                        if self.global_step % arguments.log_every == 0 or self.global_step == total_steps:
                            keys = sorted(sums)
                            means = accelerator.reduce(torch.stack([sums[k] / count for k in keys]), reduction="mean")
                            now = time.perf_counter()
                            record = self.training_record(
                                epoch,
                                dict(zip(keys, means.tolist())),
                                steps_per_s=(self.global_step - window_step) / max(now - window_start, 1e-9),
                                elapsed_s=round(now - self.start_time, 3),
                            )
                            window_start, window_step = now, self.global_step
                            self.log(record, self.tracker_values(record))
                            progress.set_postfix(loss=f"{record['loss']:.4f}")
                            sums, count = {}, 0
                        self.on_step_end()
                        if arguments.checkpointing_steps and self.global_step % arguments.checkpointing_steps == 0:
                            self.save_checkpoint()
                        if self.global_step >= total_steps or stop.requested:
                            break
                    else:  # the epoch ran to its end
                        self.on_epoch_end(epoch)
            except KeyboardInterrupt:  # a second Ctrl-C, or no handler installed
                interrupted = True
            progress.close()
            if interrupted or stop.requested:
                if self.global_step != self.last_saved and self.global_step > 0:
                    self.save_checkpoint()
                self.logger.info(
                    "interrupted at step %d; resume with --resume-from-checkpoint latest", self.global_step
                )
                end_trackers(accelerator)
                return 130

        self.on_train_end()
        if arguments.checkpointing_steps and self.global_step != self.last_saved:
            self.save_checkpoint()
        accelerator.wait_for_everyone()
        if self.main_process:
            self.save_outputs()
        accelerator.wait_for_everyone()  # every process returns once the outputs are written
        end_trackers(accelerator)
        return 0

    def _resume(self) -> None:
        """Continue from ``--resume-from-checkpoint`` when given (`resume_checkpoint`), and name the next
        checkpoint after the newest one."""
        folder = resume_checkpoint(self.arguments.resume_from_checkpoint, self.output_dir, self.logger)
        if folder is not None:
            state = json.loads((folder / STATE_FILE).read_text())
            self.resume_from(state, folder)
            if state.get("total_batch") != self.total_batch:
                self.logger.warning(
                    "checkpoint used %s %s per step, this run %d: the data order will differ",
                    state.get("total_batch"),
                    self.unit,
                    self.total_batch,
                )
            self.accelerator.load_state(str(folder))
            self.global_step = self.last_saved = int(state["global_step"])
            self.logger.info("resumed from %s at step %d", folder, self.global_step)
        self.accelerator.project_configuration.iteration = next_checkpoint_number(self.output_dir)

    def save_checkpoint(self) -> Path:
        """`Accelerator.save_state` into the next ``checkpoint_<n>``, then its ``training_state.json``
        (the step, the seed, the batch, `checkpoint_extras`) last; every process waits for it."""
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        folder = Path(accelerator.save_state())
        if self.main_process:
            write_json_atomic(
                folder / STATE_FILE,
                {
                    "global_step": self.global_step,
                    "seed": self.arguments.seed,
                    "total_batch": self.total_batch,
                    **self.checkpoint_extras(folder),
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                },
            )
        accelerator.wait_for_everyone()
        self.last_saved = self.global_step
        self.logger.info("checkpoint at step %d: %s", self.global_step, folder)
        return folder

    def data_position(self) -> dict[str, int]:
        """The loader's micro-batches per epoch and the epoch of the current step (for `checkpoint_extras`)."""
        epoch = self.global_step * self.arguments.gradient_accumulation_steps // self.micro_per_epoch
        return {"micro_batches_per_epoch": self.micro_per_epoch, "epoch": epoch}

    def log(self, record: dict[str, Any], tracked: dict[str, Any]) -> None:
        """Append ``record`` to ``logs.jsonl`` (main process; NaN and inf as null) and give the trackers the
        finite values of ``tracked`` at this step."""
        if self.main_process:
            with open(self.log_path, "a") as handle:
                handle.write(json.dumps(finite_or_none(record)) + "\n")
        if self.log_with:
            self.accelerator.log(
                {k: v for k, v in tracked.items() if v is not None and math.isfinite(v)}, step=self.global_step
            )
