"""Helpers shared by the Accelerate training scripts (`m3d.train.train_generator`, `m3d.train.train_cad`,
`m3d.train.train_detector`) and the other multi-process entry points (`m3d.build`, `m3d.train.benchmark`):
the process group (`process_state`), the Accelerator and its project folder, logging, checkpoint lookup
and resumption, per-step seeds, Ctrl-C / SIGTERM handling, JSON-safe values and atomic writes of
``save_pretrained`` folders (single files: `m3d.files`). The loop the trainers share is `m3d.train.loop`.

Light to import: Accelerate is imported inside `process_state` and `make_accelerator` only.
"""

from __future__ import annotations

import json
import math
import logging
import os
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from accelerate import Accelerator, PartialState

    from .loop import TrainingArguments

__all__ = [
    "MIXED_PRECISION",
    "STATE_FILE",
    "StopRequest",
    "complete_checkpoints",
    "configure_logging",
    "dataclass_defaults",
    "dealt",
    "end_trackers",
    "finite_or_none",
    "gather_dealt",
    "ignore_sigint",
    "json_value",
    "make_accelerator",
    "next_checkpoint_number",
    "optimizer_micro_step",
    "process_state",
    "resume_checkpoint",
    "save_pretrained_atomic",
    "step_seed",
]

MIXED_PRECISION = ("no", "bf16", "fp16")
STATE_FILE = "training_state.json"  # written last into a checkpoint: without it the checkpoint is incomplete


# -- processes, Accelerate and logging ----------------------------------------------------------

# where launchers put the number of processes they started: torchrun / `accelerate launch`, then MPI's (as
# Accelerate reads them)
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
ONE_CPU_PROCESS = (
    "`accelerate launch --cpu` started this process alone (more CPU processes need its --mpirun_hostfile): run "
    "`accelerate launch --multi_gpu --num_processes N ...` or `torchrun --nproc_per_node N ...` instead "
    "(m3d joins the processes on the CPU when there is no GPU), or unset MASTER_ADDR to run one process"
)


def launched_processes() -> int:
    """How many processes the launcher started (its ``WORLD_SIZE``); 1 without a launcher."""
    return next((int(os.environ[name]) for name in WORLD_SIZE_VARIABLES if os.environ.get(name)), 1)


def process_state(cpu: bool = False) -> PartialState:
    """This process's Accelerate `PartialState`, the processes a launcher started joined in one group: on
    the CPU (gloo) when asked (``cpu``, or ``accelerate launch --cpu``) and when there is no GPU to join
    them on, where Accelerate alone would leave each process on its own as rank 0 of 1
    (``accelerate launch --multi_gpu`` or ``torchrun`` on a CPU-only machine). Raises ValueError rather
    than run copies that do not know of each other."""
    from accelerate import PartialState
    from accelerate.utils import get_distributed_backend, get_torch_accelerator_backend, parse_flag_from_env

    launched = launched_processes()
    launched_on_cpu = parse_flag_from_env("ACCELERATE_USE_CPU")
    # `accelerate launch --cpu --num_processes N` (N > 1) sets MASTER_ADDR, then starts one process
    if launched_on_cpu and launched == 1 and os.environ.get("MASTER_ADDR") and "LOCAL_RANK" not in os.environ:
        raise ValueError(ONE_CPU_PROCESS)
    no_gpu = launched > 1 and get_distributed_backend(get_torch_accelerator_backend()[0]) is None
    state = PartialState(cpu=cpu or launched_on_cpu or no_gpu)
    if launched > 1 and state.num_processes == 1:
        raise ValueError(
            f"{launched} processes were launched (WORLD_SIZE) but this one is alone in its group: "
            "launch with `accelerate launch --num_processes N` or `torchrun --nproc_per_node N`"
        )
    return state


def make_accelerator(args: TrainingArguments, output_dir: str | Path) -> tuple[Accelerator, str | None]:
    """Create ``output_dir`` and an `Accelerator` from the CLI's ``--mixed-precision``,
    ``--gradient-accumulation-steps``, ``--cpu`` and ``--checkpoints-total-limit``, with checkpoints
    under ``OUTPUT_DIR/checkpoints`` and TensorBoard logs under ``OUTPUT_DIR/tensorboard``; returns it
    and the tracker it logs with (``"tensorboard"`` when installed, else None). Launched processes form
    one group (`process_state`), on the CPU where there is no GPU."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, is_tensorboard_available

    process_state(args.cpu)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    log_with = "tensorboard" if is_tensorboard_available() else None
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        cpu=args.cpu,
        log_with=log_with,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir),
            logging_dir=str(output_dir / "tensorboard"),
            automatic_checkpoint_naming=True,
            total_limit=args.checkpoints_total_limit,
        ),
    )
    return accelerator, log_with


def end_trackers(accelerator: Accelerator) -> None:
    """`Accelerator.end_training` but for the process group, which it would destroy: the trackers finish and
    the group stays for what the process does next (the benchmark trains cell after cell in one group)."""
    for tracker in accelerator.trackers:
        tracker.finish()


def dealt(total: int, rank: int, num_processes: int) -> range:
    """The items of ``range(total)`` that process ``rank`` handles: every ``num_processes``-th from ``rank``."""
    return range(rank, total, num_processes)


def gather_dealt(items: list, total: int, num_processes: int) -> list:
    """Every process's results of its `dealt` items (one per item), gathered on every process in the items'
    order: the order, and what depends on it (bootstrap intervals), as one process would give."""
    if num_processes == 1:
        return items
    from accelerate.utils import gather_object

    gathered = gather_object(items)
    order = [index for rank in range(num_processes) for index in dealt(total, rank, num_processes)]
    if len(gathered) != total:
        raise RuntimeError(f"gathered {len(gathered)} results of {total} items")
    result: list = [None] * total
    for index, item in zip(order, gathered):
        result[index] = item
    return result


def configure_logging(logger: logging.Logger, prog: str, main_process: bool) -> None:
    """Send ``logger``'s messages to stderr prefixed ``[prog]`` (INFO on the main process, WARNING on the
    others); library loggers keep their levels."""
    logger.setLevel(logging.INFO if main_process else logging.WARNING)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"[{prog}] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


def optimizer_micro_step(
    accelerator: Accelerator, model, batch: dict, optimizer, scheduler, max_grad_norm: float | None
):
    """One micro-batch of a model that returns its own ``loss``: forward and backward under
    ``accelerator.accumulate``, gradient clipping at ``max_grad_norm`` (None: off) when gradients sync,
    optimizer and scheduler steps; returns the loss."""
    with accelerator.accumulate(model):
        loss = model(**batch).loss
        accelerator.backward(loss)
        if max_grad_norm and accelerator.sync_gradients:
            accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return loss


def training_seconds(log_records: list[dict[str, Any]]) -> float:
    """Training time of a run from its ``logs.jsonl`` records: ``elapsed_s`` restarts with each resumed
    run, so the last value of every run is added up."""
    timed = [r for r in log_records if "elapsed_s" in r]
    if not timed:
        return 0.0
    return float(
        sum(a["elapsed_s"] for a, b in zip(timed, timed[1:]) if b["elapsed_s"] < a["elapsed_s"])
        + timed[-1]["elapsed_s"]
    )


def json_value(value: Any) -> Any:
    """``value`` if JSON writes it as is (int, float, str, bool, None), else ``str(value)``."""
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)


def dataclass_defaults(cls: type) -> dict[str, Any]:
    """The defaults of a dataclass's fields (``default_factory`` ones made), for an argument parser whose options
    are those fields to take as its own (``parser.set_defaults``): one place holds each default."""
    from dataclasses import MISSING, fields

    defaults = {}
    for field in fields(cls):
        if field.default is not MISSING:
            defaults[field.name] = field.default
        elif field.default_factory is not MISSING:
            defaults[field.name] = field.default_factory()
    return defaults


def finite_or_none(value: Any) -> Any:
    """JSON-safe: NaN / inf -> None, recursively through dicts and lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def save_pretrained_atomic(model_or_pipeline: Any, folder: Path, extra_files: dict[str, str] | None = None) -> Path:
    """``save_pretrained`` into a temporary folder beside ``folder`` (plus ``extra_files``: file name ->
    text), then swap it in for ``folder``; returns ``folder``."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model_or_pipeline.save_pretrained(str(tmp))
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


# -- checkpoints --------------------------------------------------------------------------------


def replace_folder(source: Path, target: Path, files: tuple[str, ...] | None = None) -> Path:
    """Copy ``source`` (or only its ``files``) to ``target``, replacing it whole: copied under a temporary
    name beside it, made world-readable, then renamed, so ``target`` is never half-written. The copy is
    for shipping: its configs lose ``_name_or_path`` (where the source was loaded from on this machine), and
    ``auto_map`` where the copy lacks the code it names (the copy loads through m3d's registered classes)."""
    from ..remote_code import missing_code

    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    if files is None:
        shutil.copytree(source, temporary)
    else:
        temporary.mkdir(parents=True)
        for file in files:
            shutil.copy(source / file, temporary / file)
    for config in temporary.rglob("config.json"):
        payload = json.loads(config.read_text())
        changed = payload.pop("_name_or_path", None) is not None
        if "auto_map" in payload and missing_code(config.parent, payload):
            del payload["auto_map"]
            changed = True
        if changed:
            config.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    for path in [temporary, *temporary.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    shutil.rmtree(target, ignore_errors=True)
    temporary.replace(target)
    return target


def _checkpoint_number(path: Path) -> int | None:
    match = re.fullmatch(r"checkpoint_(\d+)", path.name)
    return int(match.group(1)) if match else None


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (with ``training_state.json``) under ``OUTPUT_DIR/checkpoints``, oldest first."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _checkpoint_number(p) is not None and (p / STATE_FILE).is_file()]
    return sorted(found, key=_checkpoint_number)


def next_checkpoint_number(output_dir: str | Path) -> int:
    """The number after the highest ``checkpoint_<n>`` under ``OUTPUT_DIR/checkpoints``, complete or not
    (0 when there is none): Accelerate's next automatic checkpoint name."""
    folder = Path(output_dir) / "checkpoints"
    numbers = [_checkpoint_number(p) for p in folder.iterdir()] if folder.is_dir() else []
    numbers = [n for n in numbers if n is not None]
    return max(numbers) + 1 if numbers else 0


def resume_checkpoint(resume_from: str | None, output_dir: str | Path, logger: logging.Logger) -> Path | None:
    """The checkpoint ``--resume-from-checkpoint`` names: ``"latest"`` -> the newest complete one under
    ``output_dir`` (None, logged, when there is none); a path -> that folder, which must hold
    ``training_state.json`` (else FileNotFoundError). Without it: None, with a warning if ``output_dir``
    already holds checkpoints."""
    output_dir = Path(output_dir)
    if not resume_from:
        if complete_checkpoints(output_dir):
            logger.warning(
                "%s already holds checkpoints; pass --resume-from-checkpoint latest to continue from them", output_dir
            )
        return None
    if resume_from == "latest":
        found = complete_checkpoints(output_dir)
        if not found:
            logger.info("no complete checkpoint in %s: starting from scratch", output_dir / "checkpoints")
        return found[-1] if found else None
    path = Path(resume_from)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
    return path


# -- randomness and signals ---------------------------------------------------------------------


def step_seed(seed: int, step: int, micro: int, rank: int, num_processes: int) -> int:
    """The torch seed of micro-batch ``micro`` of process ``rank`` in optimizer step ``step``, drawn from
    ``(seed, step, micro * num_processes + rank)``: that batch's place in the step (the prepared loader
    deals batches to the processes in turn). A resumed run draws what an uninterrupted one would, and N
    processes draw, batch by batch, what one process accumulating N times the micro-batches draws."""
    batch = micro * num_processes + rank
    # the 0 stands where the rank was: one-process runs keep their seeds
    return int(np.random.SeedSequence([seed, step, batch, 0, 0x6E4]).generate_state(1, np.uint64)[0] % (2**63 - 1))


def ignore_sigint(_worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers ignore Ctrl-C (the main process decides when to stop)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class StopRequest:
    """Context manager: the first SIGINT / SIGTERM sets ``requested`` (finish the step, checkpoint, exit);
    a second SIGINT raises KeyboardInterrupt at once."""

    def __init__(self, prog: str):
        self.prog = prog
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, _frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        print(
            f"\n[{self.prog}] {self.signal_name}: finishing this step, saving a checkpoint, then exiting "
            "(Ctrl-C again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> StopRequest:
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: no handlers, Ctrl-C raises as usual
                pass
        return self

    def __exit__(self, *exc) -> bool:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False
