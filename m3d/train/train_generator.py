"""Train one M3Dsynth tampering generator (pix2pix | cyclegan | ddpm) for one task (inject | remove).

    python -m m3d.train.train_generator --model pix2pix --task inject --phantoms 8 --output-dir runs/p2p
    accelerate launch -m m3d.train.train_generator --model ddpm --task remove --lidc-root /data/LIDC-IDRI ...
    train(TrainGeneratorArguments(model="pix2pix", task="inject", output_dir="runs/p2p"))  # from Python

Data: ``--data DIR`` (cases in the `m3d phantom` layout), ``--lidc-root DIR`` (a LIDC-IDRI download),
or neither: ``--phantoms N`` synthetic scans made in memory. Sites and augmentations: `m3d.train.cubes`.

Losses and optimisers:

* pix2pix (CT-GAN): LSGAN (MSE on the PatchGAN scores, 1 = real) + ``--lambda-l1`` (100) x L1 over the
  whole cube; the discriminator sees ``(candidate, masked)``. Adam(2e-4, beta1 0.5) for G; D's own rate
  ``--d-learning-rate`` defaults to CT-GAN's 1e-6 (CT-GAN keeps D far slower than G so that the L1
  term leads and D does not overpower G early). D is updated first, then G, on every batch. With
  ``--hole-only`` the candidate is the generated hole pasted into the real context (what the pipeline
  returns with ``keep_context=True``) and L1 is averaged over the hole: G spends nothing on copying the
  context and D learns to spot seams.
* cyclegan: G: masked -> full and F: full -> masked, discriminators D_full and D_masked, LSGAN +
  ``--lambda-cycle`` (10) x cycle L1 (both directions; the full -> masked -> full one weighted by
  ``--full-cycle-weight``, 1 as CycleGAN) + 0.5 x lambda x identity L1. Unpaired: the full
  cubes of a batch are shuffled against the masked ones. Adam(2e-4, 0.5) for G+F and for the Ds
  (CycleGAN's settings; ``--d-learning-rate`` defaults to the G rate). No image pool (CycleGAN keeps 50
  past fakes for D); G+F are updated first, then the Ds. ``--hole-only`` as for pix2pix: each of G's
  outputs (translation, cycle, identity) is its hole pasted into the real context.
* pix2pix and cyclegan: ``--lambda-spectral`` (0, none) x `spectral_loss.hole_spectral_loss`, the texture of G's
  holes against the real ones' (the paired target for pix2pix, the batch's unpaired full cubes for cyclegan), and
  ``--lambda-spectral-peak`` (0, none) x `spectral_loss.spectral_peak_excess`, a peak sharper than real ones'.
* ddpm: MSE of the UNet's prediction over the cube (over the hole with ``--hole-only``: sampling replaces
  the known region anyway); the UNet sees ``concat(noisy, masked, mask)``. Defaults are the paper's:
  epsilon prediction on 2,000 linear steps (`default_scheduler`). The demo recipe, chosen to converge on a CPU budget
  (`m3d.train.demo_pipelines`; the shipped demo weights predate it): ``--prediction-type v_prediction --noise-schedule
  squaredcos_cap_v2 --num-train-timesteps 1000 --snr-gamma 5`` (v-prediction on the cosine schedule with min-SNR-5
  weighting: the high-noise steps, where the epsilon loss says little about the cube, get an x0-like weight, and the
  low-noise ones stop dominating). AdamW(1e-4); gradient norm clipped at 1; an EMA of the UNet (diffusers `EMAModel`,
  ``--ema-decay``) is what is saved, with ``--sampler`` (ddpm, ddim or dpmsolver++ on the same schedule) as its
  scheduler and ``--inference-steps`` as its default steps.
* ``--ema-decay`` gives a GAN's generator the same average (none by default): a GAN's weights swing with the
  balance of generator and discriminator from step to step, and their average is steadier (Yazici et al. 2019,
  "The Unusual Effectiveness of Averaging in GAN Training").

Accelerate runs it (devices, processes, ``--mixed-precision``, ``--gradient-accumulation-steps``).
Checkpoints (`Accelerator.save_state`, every ``--checkpointing-steps``, at the end, and on Ctrl-C / SIGTERM) go to
``OUTPUT_DIR/checkpoints/checkpoint_<n>/`` with ``training_state.json`` (written last: a checkpoint without it is
incomplete and ignored) and the EMA weights when there is an EMA (``ema_unet/`` for the DDPM, ``ema_generator/`` for
a GAN run with ``--ema-decay``: ``ema.safetensors`` + ``ema_state.json``).
``--resume-from-checkpoint latest|PATH`` restores models, optimisers, RNG states, the step counter and the data
position: all randomness of a step is drawn from ``(seed, step)``, so a resumed run continues exactly as an
uninterrupted one. Losses go to ``OUTPUT_DIR/logs.jsonl`` (and TensorBoard when installed); at the end the pipeline is
saved to ``OUTPUT_DIR/pipeline`` (`Pix2Pix3DPipeline` | `CycleGAN3DPipeline` | `M3DInpaintPipeline`, ``task``
recorded), which `m3d.pipelines.load_pipeline` reads.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import itertools
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..constants import FAKE_GENERATORS, HOLE_SIZE, TASKS
from ..errors import run_guarded
from ..files import write_json_atomic
from .common import MIXED_PRECISION, ignore_sigint, json_value, save_pretrained_atomic
from .loop import TrainingArguments, TrainingLoop
from .spectral_loss import spectral_losses

if TYPE_CHECKING:
    from ..pipelines import NoduleMaskBank

MODELS = FAKE_GENERATORS  # one generator model per name
PRESET_CHOICES = ("tiny", "demo", "default", "reference")
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# as m3d.pipelines' SAMPLERS, PREDICTION_TYPES and BETA_SCHEDULES (not imported here: a light parser)
SAMPLERS = ("ddpm", "ddim", "dpmsolver++")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "squaredcos_cap_v2")
PHANTOM_SPACINGS = ("native", "scaled")  # as m3d.dataset_builder.generate.PHANTOM_SPACINGS

DEFAULT_LR = {"pix2pix": 2e-4, "cyclegan": 2e-4, "ddpm": 1e-4}
DEFAULT_D_LR = {"pix2pix": 1e-6, "cyclegan": None}  # None: the generator's rate
GAN_BETAS = (0.5, 0.999)
DEFAULT_EMA_DECAY = {"ddpm": 0.9999}  # the GANs keep no EMA unless --ema-decay asks

logger = logging.getLogger("m3d.train.train_generator")


# -- arguments ----------------------------------------------------------------------------------


@dataclass(kw_only=True)
class TrainGeneratorArguments(TrainingArguments):
    """`m3d train-generator`'s options (`build_parser` describes each)."""

    model: str
    task: str
    preset: str = "default"
    config_overrides: str | None = None
    data: str | None = None
    lidc_root: str | None = None
    max_scans: int | None = None
    phantoms: int = 8
    phantom_size: int = 320
    phantom_max_slices: int | None = 48
    phantom_spacing: str = "native"
    cube_cache: str | None = None
    only_kept_sites: bool = False
    site_diameter_mm: list[float] | None = None
    init_from: str | None = None
    max_steps: int = 500
    batch_size: int = 8
    learning_rate: float | None = None
    d_learning_rate: float | None = None
    lr_decay_steps: int = 0
    lambda_l1: float = 100.0
    hole_only: bool = False
    lambda_cycle: float = 10.0
    full_cycle_weight: float = 1.0
    lambda_spectral: float = 0.0
    lambda_spectral_peak: float = 0.0
    ema_decay: float | None = None
    prediction_type: str = "epsilon"
    noise_schedule: str = "linear"
    num_train_timesteps: int = 2000
    snr_gamma: float | None = None
    max_grad_norm: float | None = None
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = 3
    save_dtype: str = "fp32"
    sampler: str = "ddpm"
    inference_steps: int = 50
    test_time_dropout: bool = False
    nodule_diameter_mm: list[float] | None = None

    def check(self) -> None:
        """ValueError for values the parser lets through."""
        self.require_positive(
            "max_steps",
            "batch_size",
            "gradient_accumulation_steps",
            "log_every",
            "phantoms",
            "phantom_size",
            "inference_steps",
            "num_train_timesteps",
            optional=("max_scans",),
        )
        if self.checkpointing_steps < 0 or self.num_workers < 0:
            raise ValueError("--checkpointing-steps and --num-workers must not be negative")
        if not 0 <= self.lr_decay_steps <= self.max_steps:
            raise ValueError(
                f"--lr-decay-steps must be between 0 and --max-steps ({self.max_steps}); got {self.lr_decay_steps}"
            )
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError("--checkpoints-total-limit must be positive")
        if self.full_cycle_weight < 0:
            raise ValueError(f"--full-cycle-weight must not be negative; got {self.full_cycle_weight}")
        overrides = parse_config_overrides(self.config_overrides)
        spectral_weights = {
            "--lambda-spectral": self.lambda_spectral,
            "--lambda-spectral-peak": self.lambda_spectral_peak,
        }
        for option, weight in spectral_weights.items():
            if weight < 0:
                raise ValueError(f"{option} must not be negative; got {weight}")
            if weight > 0 and self.model == "ddpm":
                raise ValueError(f"{option} is for pix2pix and cyclegan; the ddpm has no generated hole to compare")
        if self.test_time_dropout and self.model == "ddpm":
            raise ValueError("--test-time-dropout is for pix2pix and cyclegan (their dropout); got --model ddpm")
        if self.test_time_dropout and self.model == "cyclegan" and not overrides.get("dropout"):
            raise ValueError(
                "--test-time-dropout needs a cyclegan with dropout: put dropout=0.5 in --config-overrides"
            )
        for option, value in (
            ("--nodule-diameter-mm", self.nodule_diameter_mm),
            ("--site-diameter-mm", self.site_diameter_mm),
        ):
            if value is not None and not 0 <= value[0] <= value[1]:
                raise ValueError(f"{option} must be LOW HIGH with 0 <= LOW <= HIGH; got {value}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"--ema-decay must be between 0 and 1 (exclusive); got {self.ema_decay}")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ValueError(f"--snr-gamma must be positive; got {self.snr_gamma}")
        check_config_overrides(self.model, overrides)
        if self.model == "pix2pix" and self.batch_size < 2:
            raise ValueError("pix2pix trains BatchNorm down to a 1^3 bottleneck: --batch-size must be at least 2")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m m3d.train.train_generator",
        description="Train an M3Dsynth tampering generator (CT-GAN pix2pix, CycleGAN or DDPM) on 32 mm nodule "
        "cubes; saves a diffusers pipeline folder (OUTPUT_DIR/pipeline). Runs under `accelerate launch` too.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    what = parser.add_argument_group("what to train")
    what.add_argument(
        "--model", choices=MODELS, required=True, help="generator: CT-GAN pix2pix, 3-D CycleGAN or conditional DDPM"
    )
    what.add_argument(
        "--task",
        choices=TASKS,
        required=True,
        help="inject: learn malignant nodules (median malignancy >= 4, > 10 mm); "
        "remove: learn benign ones (median malignancy <= 2, < 8 mm)",
    )
    what.add_argument(
        "--preset",
        choices=PRESET_CHOICES,
        help="network sizes: each network's presets (m3d.models; tiny: tests; demo: the shipped demo "
        "pipelines', trains in "
        "minutes on a CPU; default: CPU-sized; reference: the papers')",
    )
    what.add_argument(
        "--config-overrides",
        metavar="KEY=VALUE,...",
        help="change the generator's (cyclegan: both generators'; ddpm: the UNet's) config from --preset's, e.g. "
        "n_downsampling=1 (values read as JSON, else as text); the saved pipeline's config records them",
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
    data.add_argument("--phantom-size", type=int, help="in-plane matrix of the synthetic scans (the builder's)")
    data.add_argument("--phantom-max-slices", type=int, help="cap on the synthetic scans' slices (the builder's)")
    data.add_argument(
        "--phantom-spacing",
        choices=PHANTOM_SPACINGS,
        help="native: the real series' pixel and slice spacing (as the dataset builder); scaled: the real "
        "field of view on --phantom-size pixels (coarser: the cubes are upsampled to 1 mm)",
    )
    data.add_argument(
        "--cube-cache",
        metavar="DIR",
        help="keep the cut training cubes here (an .npz per task and data source) and reuse them",
    )

    run = parser.add_argument_group("training")
    run.add_argument(
        "--output-dir", required=True, metavar="DIR", help="checkpoints, logs.jsonl and pipeline/ go here"
    )
    run.add_argument("--max-steps", type=int, help="optimizer steps in all (a resumed run counts on)")
    run.add_argument("--batch-size", type=int, help="cubes per process and micro-batch")
    run.add_argument(
        "--only-kept-sites",
        action="store_true",
        help="train only on the sites whose real nodule passes the dataset builder's quality check for the "
        "task (m3d.tamper.quality: inject > 10 mm, remove < 8 mm of solid tissue above -400 HU), so the "
        "generator learns what the builder keeps (about half of the phantoms' malignant nodules are "
        "part-solid or ground glass and measure smaller)",
    )
    run.add_argument(
        "--site-diameter-mm",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="train only on the sites whose real nodule measures LOW-HIGH mm (equivalent diameter of its solid "
        "tissue above -400 HU as the builder's quality check measures it; 0 where there is none): the size of "
        "nodule an unconditioned generator learns to draw, e.g. a remover that should leave well under the "
        "builder's 8 mm",
    )
    run.add_argument(
        "--init-from",
        metavar="PIPELINE_DIR",
        help="fine-tune: start the generator (GANs) or the UNet (ddpm) from a saved pipeline folder of the same "
        "--model and --task (its weights must fit --preset; the discriminators start fresh; a resumed "
        "checkpoint takes precedence)",
    )
    run.add_argument(
        "--learning-rate", type=float, help="generator / UNet rate (default: pix2pix and cyclegan 2e-4, ddpm 1e-4)"
    )
    run.add_argument(
        "--d-learning-rate",
        type=float,
        help="discriminator rate (default: pix2pix 1e-6 as CT-GAN; cyclegan = --learning-rate)",
    )
    run.add_argument(
        "--lr-decay-steps",
        type=int,
        metavar="N",
        help="every rate falls linearly toward zero over the last N of --max-steps (CycleGAN's schedule: half of "
        "them); 0: constant rates",
    )
    run.add_argument("--gradient-accumulation-steps", type=int, help="micro-batches per optimizer step")
    run.add_argument(
        "--mixed-precision",
        choices=MIXED_PRECISION,
        help="Accelerate mixed precision of the forward passes (bf16 on recent GPUs)",
    )
    run.add_argument("--lambda-l1", type=float, help="pix2pix: weight of the L1 term")
    run.add_argument(
        "--hole-only",
        action="store_true",
        help="pix2pix, cyclegan: losses and D on G's hole pasted into the real context (as at inference); "
        "ddpm: the noise MSE over the hole only",
    )
    run.add_argument("--lambda-cycle", type=float, help="cyclegan: cycle weight (identity: half of it)")
    run.add_argument(
        "--full-cycle-weight",
        type=float,
        help="cyclegan: weight of the full -> masked -> full cycle relative to --lambda-cycle (1, CycleGAN's; "
        "0: G is never asked to redraw a masked-out nodule exactly, which pulls an injector toward no nodule)",
    )
    run.add_argument(
        "--lambda-spectral",
        type=float,
        help="pix2pix, cyclegan: weight of the spectral loss (m3d.train.spectral_loss: the mean |log ratio| of the "
        "generated and real holes' high-pass power per (|k_z|, in-plane radius); 0, the default: none): a fill too "
        "smooth at some frequencies, or painting a pattern of its own, is off there whatever the phase",
    )
    run.add_argument(
        "--lambda-spectral-peak",
        type=float,
        help="pix2pix, cyclegan: weight of the spectral peak loss (m3d.train.spectral_loss.spectral_peak_excess: how "
        "much sharper the generated holes' sharpest spectral peak, a bin over the median of its 5^3 neighbours as the "
        "evaluation measures it, is than the real holes'; 0, the default: none): a lattice the ring-averaged "
        "--lambda-spectral cannot see",
    )
    run.add_argument(
        "--ema-decay",
        type=float,
        help="keep an exponential moving average of the pipeline's network with this decay (warmed up as "
        "min(decay, (1+n)/(10+n))) and save it instead of the last weights (ddpm: 0.9999 by default; the GANs: "
        "none by default)",
    )
    run.add_argument(
        "--prediction-type",
        choices=PREDICTION_TYPES,
        help="ddpm: what the UNet predicts: the noise (the paper), the velocity v or the clean cube",
    )
    run.add_argument(
        "--noise-schedule",
        choices=BETA_SCHEDULES,
        help="ddpm: linear betas 1e-4 -> 0.02 (the paper) or the cosine schedule (squaredcos_cap_v2)",
    )
    run.add_argument("--num-train-timesteps", type=int, help="ddpm: diffusion steps of the schedule (the paper: 2000)")
    run.add_argument(
        "--snr-gamma",
        type=float,
        help="ddpm: min-SNR-gamma loss weighting (Hang et al. 2023 use 5); default: unweighted",
    )
    run.add_argument("--max-grad-norm", type=float, help="clip gradient norms (default: ddpm 1.0, GANs off)")
    run.add_argument("--seed", type=int, help="seeds the data, the augmentations and every step's randomness")
    run.add_argument("--num-workers", type=int, help="DataLoader worker processes")
    run.add_argument("--cpu", action="store_true", help="train on the CPU even when an accelerator is present")

    save = parser.add_argument_group("checkpoints and logs")
    save.add_argument(
        "--checkpointing-steps", type=int, help="save a checkpoint every N steps and at the end (0: only on interrupt)"
    )
    save.add_argument("--checkpoints-total-limit", type=int, help="keep at most this many checkpoints")
    save.add_argument(
        "--resume-from-checkpoint",
        metavar="latest|PATH",
        help="continue from OUTPUT_DIR's newest complete checkpoint (latest; a fresh start if none) or a folder",
    )
    save.add_argument("--log-every", type=int, help="write mean losses to logs.jsonl every N steps")
    save.add_argument("--no-progress", action="store_true", help="no progress bar")
    save.add_argument(
        "--save-dtype",
        choices=tuple(SAVE_DTYPES),
        help="dtype of the saved pipeline's weights (from_pretrained loads them as fp32)",
    )
    save.add_argument(
        "--sampler",
        choices=SAMPLERS,
        help=(
            "ddpm: the scheduler saved with the pipeline (the training schedule, sampled with ddpm, "
            "ddim or dpmsolver++)"
        ),
    )
    save.add_argument(
        "--inference-steps",
        type=int,
        help="ddpm: the pipeline's default num_inference_steps (saved in model_index.json)",
    )
    save.add_argument(
        "--test-time-dropout",
        action="store_true",
        help="pix2pix, cyclegan: the saved pipeline keeps the network's dropout on when it generates (pix2pix's "
        "noise; saved in model_index.json as its default 'stochastic'): the texture the generator learned with it "
        "(a cyclegan needs dropout=0.5 in --config-overrides)",
    )
    save.add_argument(
        "--nodule-diameter-mm",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="a mask-conditioned pipeline draws, when a call names no size, the training nodule masks of this "
        "equivalent diameter (saved in nodule_mask_bank/config.json; default: any of them)",
    )
    parser.set_defaults(**TrainGeneratorArguments.defaults())
    return parser


def parse_arguments(argv: Sequence[str] | None = None, prog: str | None = None) -> TrainGeneratorArguments:
    """The command line ``argv`` (None: ``sys.argv``) as `TrainGeneratorArguments`."""
    return TrainGeneratorArguments.parse(build_parser(prog), argv)


# -- networks and steps -------------------------------------------------------------------------


def _set_requires_grad(modules: Sequence[nn.Module], flag: bool) -> None:
    for module in modules:
        for parameter in module.parameters():
            parameter.requires_grad_(flag)


def _lsgan(scores: torch.Tensor, real: bool) -> torch.Tensor:
    scores = scores.float()
    return F.mse_loss(scores, torch.ones_like(scores) if real else torch.zeros_like(scores))


def _generator_input(
    network: nn.Module, cube: torch.Tensor, mask: torch.Tensor, nodule_mask: torch.Tensor, condition_only: bool = False
) -> torch.Tensor:
    """What the pipeline gives ``network`` (`m3d.pipelines.common.network_input`): the cube, the hole mask as its
    ``in_channels`` ask, and for a mask-conditioned network the mask of the nodule to draw (``condition_only``:
    the DDPM's condition, its input less the noisy cube)."""
    from ..pipelines.common import network_input

    return network_input(cube, mask, network.config.in_channels - condition_only, nodule_mask)


def widen_input_channels(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``source``'s weights, where the ``target`` network takes more input channels (a nodule mask added to a trained
    network): a convolution whose input dimension is larger in ``target`` gets its new input channels at zero, so that
    the widened network starts out computing what ``source`` did (as diffusers widens Stable Diffusion's UNet for
    inpainting). Other mismatches are left for ``load_state_dict`` to report."""
    widened = dict(source)
    for name, weights in source.items():
        wanted = target.get(name)
        if wanted is None or wanted.ndim < 2 or wanted.shape == weights.shape:
            continue
        if (
            wanted.shape[0] == weights.shape[0]
            and wanted.shape[2:] == weights.shape[2:]
            and wanted.shape[1] > weights.shape[1]
        ):
            padding = torch.zeros(
                (weights.shape[0], wanted.shape[1] - weights.shape[1], *weights.shape[2:]), dtype=weights.dtype
            )
            widened[name] = torch.cat([weights, padding], dim=1)
    return widened


class GeneratorTrainer:
    """One model's networks, optimisers, training step and pipeline (subclasses per model)."""

    model = ""
    network_name = "generator"  # the network that the pipeline holds ...
    pipeline_component = "network"  # ... and its component name there

    def __init__(
        self,
        task: str,
        preset: str,
        lr: float,
        d_lr: float | None,
        args: TrainGeneratorArguments | None = None,
        config_overrides: dict[str, Any] | None = None,
    ):
        self.task = task
        self.preset = preset
        self.config_overrides = dict(config_overrides or {})
        self.lr = lr
        self.d_lr = d_lr
        self.args = args
        self.networks: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.max_grad_norm: float | None = None
        self.accelerator = None
        self.base_rates: dict[str, list[float]] = {}
        self.ema = None

    @property
    def ema_decay(self) -> float | None:
        """The EMA's decay, None without an EMA."""
        return self.ema.decay if self.ema is not None else None

    @property
    def ema_folder(self) -> str:
        """The checkpoint's folder for the EMA of the pipeline's network (``ema_unet`` for the DDPM)."""
        return f"ema_{self.network_name}"

    def start_ema(self, decay: float) -> None:
        """Average the pipeline's network from its current weights on (diffusers `EMAModel`): what is saved."""
        from diffusers.training_utils import EMAModel

        network = self.unwrap(self.network_name)
        self.ema = EMAModel(network.parameters(), decay=decay, model_cls=type(network), model_config=network.config)
        if self.accelerator:
            self.ema.to(self.accelerator.device)

    def prepare(self, accelerator) -> None:
        """Wrap the networks and optimisers with Accelerate (call once); the optimisers' rates now are the
        base rates that `scale_learning_rates` scales."""
        names, opt_names = list(self.networks), list(self.optimizers)
        self.base_rates = {n: [group["lr"] for group in self.optimizers[n].param_groups] for n in opt_names}
        prepared = accelerator.prepare(*[self.networks[n] for n in names], *[self.optimizers[n] for n in opt_names])
        prepared = prepared if isinstance(prepared, (tuple, list)) else (prepared,)
        self.networks = dict(zip(names, prepared[: len(names)]))
        self.optimizers = dict(zip(opt_names, prepared[len(names) :]))
        self.accelerator = accelerator
        if self.ema is not None:
            self.ema.to(accelerator.device)

    def train(self) -> None:
        for network in self.networks.values():
            network.train()

    def scale_learning_rates(self, factor: float) -> None:
        """Set every optimiser's rates to ``factor`` times its base rates (a resumed optimiser's saved rates
        are overwritten too: the schedule is a function of the step alone)."""
        for name, optimizer in self.optimizers.items():
            for group, base in zip(optimizer.param_groups, self.base_rates[name]):
                group["lr"] = base * factor

    def _update(self, loss: torch.Tensor, optimizer: str, modules: Sequence[nn.Module]) -> None:
        accelerator = self.accelerator
        accelerator.backward(loss)
        if self.max_grad_norm and accelerator.sync_gradients:
            accelerator.clip_grad_norm_(itertools.chain(*[m.parameters() for m in modules]), self.max_grad_norm)
        self.optimizers[optimizer].step()
        self.optimizers[optimizer].zero_grad(set_to_none=True)

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_optimizer_step(self) -> None:
        """Called once per optimizer step (after gradients were synchronised): the EMA's step."""
        if self.ema is not None:
            self.ema.step(self.unwrap(self.network_name).parameters())

    def init_from(self, folder: str | Path) -> None:
        """Load the pipeline network's weights from the saved pipeline ``folder`` (before `prepare`)."""
        from ..pipelines import load_pipeline

        pipe = load_pipeline(folder)
        source = getattr(pipe, self.pipeline_component, None)
        target = self.networks[self.network_name]
        if type(source) is not type(target) or pipe.config.task != self.task:
            found = f"a {type(source).__name__} for {pipe.config.task}"
            raise ValueError(
                f"--init-from {folder} holds {found}; --model {self.model} --task {self.task} trains a "
                f"{type(target).__name__} for {self.task}"
            )
        try:  # load_pipeline gives fp32; the copy keeps the target's dtype
            target.load_state_dict(widen_input_channels(source.state_dict(), target.state_dict()))
        except RuntimeError as error:
            raise ValueError(
                f"--init-from {folder}: its weights do not fit --preset {self.preset} ({str(error).splitlines()[0]})"
            ) from None
        if self.ema is not None:
            self.start_ema(self.ema.decay)  # the average starts from the loaded weights

    def unwrap(self, name: str) -> nn.Module:
        return self.accelerator.unwrap_model(self.networks[name]) if self.accelerator else self.networks[name]

    def pipeline(self):
        raise NotImplementedError

    def pipeline_network(self) -> nn.Module:
        """A float CPU copy of the pipeline's network in eval mode: the EMA weights when there is an EMA (its
        buffers, e.g. BatchNorm statistics, from the trained network), else the trained ones."""
        network = self.unwrap(self.network_name)
        copy = type(network).from_config(network.config)
        copy.load_state_dict({k: v.detach().float().cpu() for k, v in network.state_dict().items()})
        if self.ema is not None:
            self.ema.copy_to(copy.parameters())
        return copy.eval()

    # checkpoint extras: the EMA
    def save_extra(self, folder: Path) -> None:
        """The EMA: shadow weights by parameter name (safetensors) + its counters (JSON)."""
        if self.ema is None:
            return
        from safetensors.torch import save_file

        state = self.ema.state_dict()
        shadow = state.pop("shadow_params")
        names = [name for name, _ in self.unwrap(self.network_name).named_parameters()]
        target = folder / self.ema_folder
        target.mkdir(parents=True, exist_ok=True)
        save_file({n: p.detach().contiguous().cpu() for n, p in zip(names, shadow)}, str(target / "ema.safetensors"))
        write_json_atomic(target / "ema_state.json", {k: json_value(v) for k, v in state.items()})

    def load_extra(self, folder: Path) -> None:
        if self.ema is None:
            return
        from safetensors.torch import load_file

        target = folder / self.ema_folder
        if not (target / "ema.safetensors").is_file():
            raise FileNotFoundError(
                f"{target / 'ema.safetensors'} missing: checkpoint {folder} keeps no EMA of the {self.network_name}"
            )
        weights = load_file(str(target / "ema.safetensors"))
        names = [name for name, _ in self.unwrap(self.network_name).named_parameters()]
        if sorted(weights) != sorted(names):
            raise ValueError(f"{target} holds EMA weights of another {self.network_name} configuration")
        state = json.loads((target / "ema_state.json").read_text())
        state["shadow_params"] = [weights[n] for n in names]
        self.ema.load_state_dict(state)
        self.ema.to(self.accelerator.device if self.accelerator else "cpu")


class Pix2PixTrainer(GeneratorTrainer):
    model = "pix2pix"

    def __init__(
        self,
        task,
        preset,
        lr,
        d_lr,
        args=None,
        config_overrides=None,
        lambda_l1: float = 100.0,
        hole_only: bool = False,
        lambda_spectral: float = 0.0,
        lambda_spectral_peak: float = 0.0,
    ):
        super().__init__(task, preset, lr, d_lr, args, config_overrides)
        from ..models import PatchDiscriminator3D, Pix2Pix3DGenerator

        self.lambda_l1 = lambda_l1
        self.hole_only = hole_only
        self.lambda_spectral = lambda_spectral
        self.lambda_spectral_peak = lambda_spectral_peak
        generator = Pix2Pix3DGenerator.from_preset(preset, **self.config_overrides)
        discriminator = PatchDiscriminator3D.from_preset(preset)
        self.networks = {"generator": generator, "discriminator": discriminator}
        self.optimizers = {
            "generator": torch.optim.Adam(generator.parameters(), lr=lr, betas=GAN_BETAS),
            "discriminator": torch.optim.Adam(discriminator.parameters(), lr=d_lr, betas=GAN_BETAS),
        }

    def step(self, batch):
        G, D = self.networks["generator"], self.networks["discriminator"]
        full, masked, mask = batch["full"], batch["masked"], batch["mask"]
        fake = G(_generator_input(self.unwrap("generator"), masked, mask, batch["nodule_mask"])).sample.float()
        l1_weights = torch.ones_like(mask)
        if self.hole_only:  # the candidate the pipeline returns: generated hole, real context
            fake = mask * fake + (1 - mask) * full
            l1_weights = mask
        # discriminator first (CT-GAN): real (full, masked) -> 1, fake -> 0
        loss_d = 0.5 * (_lsgan(D(full, masked), True) + _lsgan(D(fake.detach(), masked), False))
        self._update(loss_d, "discriminator", [D])
        # generator: fool the (frozen) discriminator + L1 to the real cube
        _set_requires_grad([D], False)
        try:
            loss_gan = _lsgan(D(fake, masked), True)
            loss_l1 = ((fake - full).abs() * l1_weights).sum() / l1_weights.sum()
            loss_spectral, spectral = spectral_losses(
                fake, full, mask, self.lambda_spectral, self.lambda_spectral_peak
            )
            loss_g = loss_gan + self.lambda_l1 * loss_l1 + loss_spectral
            losses = {"loss_g_gan": loss_gan.detach(), "loss_l1": loss_l1.detach(), **spectral}
            self._update(loss_g, "generator", [G])
        finally:
            _set_requires_grad([D], True)
        return {"loss": loss_g.detach(), **losses, "loss_d": loss_d.detach()}

    def pipeline(self):
        from ..pipelines import Pix2Pix3DPipeline

        return Pix2Pix3DPipeline(
            network=self.pipeline_network(),
            task=self.task,
            stochastic=getattr(self.args, "test_time_dropout", False),
        )


class CycleGANTrainer(GeneratorTrainer):
    model = "cyclegan"

    def __init__(
        self,
        task,
        preset,
        lr,
        d_lr,
        args=None,
        config_overrides=None,
        lambda_cycle: float = 10.0,
        full_cycle_weight: float = 1.0,
        hole_only: bool = False,
        lambda_spectral: float = 0.0,
        lambda_spectral_peak: float = 0.0,
    ):
        super().__init__(task, preset, lr, d_lr, args, config_overrides)
        from ..models import CycleGAN3DDiscriminator, CycleGAN3DGenerator

        self.lambda_cycle = lambda_cycle
        self.full_cycle_weight = full_cycle_weight
        self.lambda_spectral = lambda_spectral
        self.lambda_spectral_peak = lambda_spectral_peak
        self.hole_only = hole_only
        G = CycleGAN3DGenerator.from_preset(preset, **self.config_overrides)  # masked -> full (the pipeline's)
        Fr = CycleGAN3DGenerator.from_preset(preset, **{**self.config_overrides, "in_channels": 1})  # full -> masked
        D_full = CycleGAN3DDiscriminator.from_preset(preset, in_channels=1)
        D_masked = CycleGAN3DDiscriminator.from_preset(preset, in_channels=1)
        self.networks = {
            "generator": G,
            "reverse_generator": Fr,
            "discriminator_full": D_full,
            "discriminator_masked": D_masked,
        }
        self.optimizers = {
            "generators": torch.optim.Adam(itertools.chain(G.parameters(), Fr.parameters()), lr=lr, betas=GAN_BETAS),
            "discriminators": torch.optim.Adam(
                itertools.chain(D_full.parameters(), D_masked.parameters()),
                lr=d_lr if d_lr is not None else lr,
                betas=GAN_BETAS,
            ),
        }

    def step(self, batch):
        n = self.networks
        G, Fr, D_full, D_masked = (
            n["generator"],
            n["reverse_generator"],
            n["discriminator_full"],
            n["discriminator_masked"],
        )
        g_net = self.unwrap("generator")
        mask = batch["mask"]
        real_masked = batch["masked"]  # domain A
        unpaired = torch.randperm(batch["full"].shape[0], device="cpu").to(mask.device)
        real_full = batch["full"][unpaired]  # domain B, unpaired
        real_nodules = batch["nodule_mask"][unpaired]  # its nodules: what a mask-conditioned G is told to draw

        def to_full(cube: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            """G's output, drawing ``real_nodules``; with ``hole_only`` its hole pasted into ``context`` (as the
            pipeline does)."""
            out = G(_generator_input(g_net, cube, mask, real_nodules)).sample.float()
            return mask * out + (1 - mask) * context if self.hole_only else out

        _set_requires_grad([D_full, D_masked], False)
        try:
            fake_full = to_full(real_masked, real_masked)
            rec_masked = Fr(fake_full).sample.float()
            fake_masked = Fr(real_full).sample.float()
            rec_full = to_full(fake_masked, real_full)
            idt_full = to_full(real_full, real_full)
            idt_masked = Fr(real_masked).sample.float()
            loss_gan = _lsgan(D_full(fake_full), True) + _lsgan(D_masked(fake_masked), True)
            loss_cycle = F.l1_loss(rec_masked, real_masked) + self.full_cycle_weight * F.l1_loss(rec_full, real_full)
            loss_idt = F.l1_loss(idt_full, real_full) + F.l1_loss(idt_masked, real_masked)
            loss_spectral, spectral = spectral_losses(
                fake_full, real_full, mask, self.lambda_spectral, self.lambda_spectral_peak
            )
            loss_g = loss_gan + self.lambda_cycle * loss_cycle + 0.5 * self.lambda_cycle * loss_idt + loss_spectral
            self._update(loss_g, "generators", [G, Fr])
        finally:
            _set_requires_grad([D_full, D_masked], True)
        loss_d_full = 0.5 * (_lsgan(D_full(real_full), True) + _lsgan(D_full(fake_full.detach()), False))
        loss_d_masked = 0.5 * (_lsgan(D_masked(real_masked), True) + _lsgan(D_masked(fake_masked.detach()), False))
        loss_d = loss_d_full + loss_d_masked
        self._update(loss_d, "discriminators", [D_full, D_masked])
        return {
            "loss": loss_g.detach(),
            "loss_g_gan": loss_gan.detach(),
            "loss_cycle": loss_cycle.detach(),
            "loss_identity": loss_idt.detach(),
            **spectral,
            "loss_d": loss_d.detach(),
        }

    def pipeline(self):
        from ..pipelines import CycleGAN3DPipeline

        return CycleGAN3DPipeline(
            network=self.pipeline_network(),
            task=self.task,
            stochastic=getattr(self.args, "test_time_dropout", False),
        )


class DDPMTrainer(GeneratorTrainer):
    model = "ddpm"
    network_name = "unet"
    pipeline_component = "unet"

    def __init__(
        self,
        task,
        preset,
        lr,
        d_lr=None,
        args=None,
        config_overrides=None,
        hole_only: bool = False,
        prediction_type: str = "epsilon",
        beta_schedule: str = "linear",
        num_train_timesteps: int = 2000,
        snr_gamma: float | None = None,
    ):
        super().__init__(task, preset, lr, None, args, config_overrides)
        self.hole_only = hole_only
        self.snr_gamma = snr_gamma
        from ..models import UNet3DModel
        from ..pipelines import default_scheduler

        unet = UNet3DModel.from_preset(preset, **self.config_overrides)
        self.scheduler = default_scheduler(num_train_timesteps, prediction_type, beta_schedule)
        self.networks = {"unet": unet}
        self.optimizers = {"unet": torch.optim.AdamW(unet.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=1e-2)}
        self.max_grad_norm = 1.0

    def step(self, batch):
        unet = self.networks["unet"]
        full, masked, mask = batch["full"], batch["masked"], batch["mask"]
        noise = torch.randn_like(full)
        steps = self.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (full.shape[0],), device=full.device, dtype=torch.long)
        noisy = self.scheduler.add_noise(full, noise, timesteps)
        condition = _generator_input(self.unwrap("unet"), masked, mask, batch["nodule_mask"], condition_only=True)
        prediction = unet(torch.cat([noisy, condition], dim=1), timesteps).sample.float()
        weights = mask if self.hole_only else torch.ones_like(mask)  # sampling keeps the known region anyway
        error = ((prediction - self.target(full, noise, timesteps)) ** 2 * weights).flatten(1).sum(
            1
        ) / weights.flatten(1).sum(1)
        loss = (error * self.timestep_weights(timesteps)).mean()
        self._update(loss, "unet", [unet])
        return {"loss": loss.detach()}

    def target(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the UNet learns to output: the noise, the velocity or the clean cube."""
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.scheduler.get_velocity(clean, noise, timesteps)
        return clean

    def timestep_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
        Weighting Strategy"), written for the prediction type: each timestep's weight is as if the loss
        were on x0 with the SNR clipped at gamma; ones without ``snr_gamma``."""
        if not self.snr_gamma:
            return torch.ones(timesteps.shape, device=timesteps.device)
        alphas_cumprod = self.scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
        snr = alphas_cumprod / (1 - alphas_cumprod)
        clipped = snr.clamp(max=self.snr_gamma)
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return clipped / snr
        if kind == "v_prediction":
            return clipped / (snr + 1)
        return clipped

    def pipeline(self):
        from ..pipelines import M3DInpaintPipeline, inference_scheduler

        sampler = getattr(self.args, "sampler", "ddpm")
        steps = getattr(self.args, "inference_steps", 50)
        return M3DInpaintPipeline(
            unet=self.pipeline_network(),
            scheduler=inference_scheduler(sampler, self.scheduler),
            task=self.task,
            num_inference_steps=steps,
        )


TRAINERS = {"pix2pix": Pix2PixTrainer, "cyclegan": CycleGANTrainer, "ddpm": DDPMTrainer}


def parse_config_overrides(text: str | None) -> dict[str, Any]:
    """``"n_downsampling=1,ngf=16"`` -> ``{"n_downsampling": 1, "ngf": 16}`` (values read as JSON, else as text)."""
    overrides: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise ValueError(f"--config-overrides takes KEY=VALUE pairs separated by commas; got {item!r}")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value.strip()
    return overrides


def check_config_overrides(model: str, overrides: dict[str, Any]) -> None:
    """ValueError naming the keys of ``overrides`` that ``model``'s generator network does not take."""
    from .. import models

    network = {
        "pix2pix": models.Pix2Pix3DGenerator,
        "cyclegan": models.CycleGAN3DGenerator,
        "ddpm": models.UNet3DModel,
    }[model]
    known = set(inspect.signature(network.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(
            f"--config-overrides: {network.__name__} has no {', '.join(unknown)}; it takes " + ", ".join(sorted(known))
        )


def make_trainer(
    model: str,
    task: str,
    preset: str = "default",
    *,
    config_overrides: dict[str, Any] | None = None,
    learning_rate: float | None = None,
    d_learning_rate: float | None = None,
    lambda_l1: float = 100.0,
    hole_only: bool = False,
    lambda_cycle: float = 10.0,
    full_cycle_weight: float = 1.0,
    lambda_spectral: float = 0.0,
    lambda_spectral_peak: float = 0.0,
    ema_decay: float | None = None,
    max_grad_norm: float | None = None,
    prediction_type: str = "epsilon",
    beta_schedule: str = "linear",
    num_train_timesteps: int = 2000,
    snr_gamma: float | None = None,
) -> GeneratorTrainer:
    """A trainer with fresh networks (`prepare` it with an `Accelerator` before `step`)."""
    if model not in TRAINERS:
        raise ValueError(f"model must be one of {MODELS}; got {model!r}")
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}; got {task!r}")
    if preset not in PRESET_CHOICES:
        raise ValueError(f"preset must be one of {PRESET_CHOICES}; got {preset!r}")
    check_config_overrides(model, config_overrides or {})
    lr = learning_rate if learning_rate is not None else DEFAULT_LR[model]
    d_lr = d_learning_rate if d_learning_rate is not None else DEFAULT_D_LR.get(model)
    if model == "pix2pix":
        trainer = Pix2PixTrainer(
            task,
            preset,
            lr,
            d_lr,
            config_overrides=config_overrides,
            lambda_l1=lambda_l1,
            hole_only=hole_only,
            lambda_spectral=lambda_spectral,
            lambda_spectral_peak=lambda_spectral_peak,
        )
    elif model == "cyclegan":
        trainer = CycleGANTrainer(
            task,
            preset,
            lr,
            d_lr,
            config_overrides=config_overrides,
            lambda_cycle=lambda_cycle,
            full_cycle_weight=full_cycle_weight,
            hole_only=hole_only,
            lambda_spectral=lambda_spectral,
            lambda_spectral_peak=lambda_spectral_peak,
        )
    else:
        trainer = DDPMTrainer(
            task,
            preset,
            lr,
            config_overrides=config_overrides,
            hole_only=hole_only,
            prediction_type=prediction_type,
            beta_schedule=beta_schedule,
            num_train_timesteps=num_train_timesteps,
            snr_gamma=snr_gamma,
        )
    ema_decay = ema_decay if ema_decay is not None else DEFAULT_EMA_DECAY.get(model)
    if ema_decay is not None:
        trainer.start_ema(ema_decay)
    if max_grad_norm is not None:
        trainer.max_grad_norm = max_grad_norm if max_grad_norm > 0 else None
    return trainer


# -- data ---------------------------------------------------------------------------------------


def _data_key(args: TrainGeneratorArguments) -> dict[str, Any]:
    """What the training cubes depend on (the cube cache's key)."""
    from ..tamper.cube import TRAIN_CUBE_SIZE
    from . import cubes

    rules = [
        cubes.INJECT_MIN_MALIGNANCY,
        cubes.INJECT_MIN_DIAMETER_MM,
        cubes.REMOVE_MAX_MALIGNANCY,
        cubes.REMOVE_MAX_DIAMETER_MM,
        TRAIN_CUBE_SIZE,
    ]
    key: dict[str, Any] = {"task": args.task, "rules": rules, "version": 1}
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
            nodules=repr(cubes.PHANTOM_NODULES.get(args.task)),
            spacing=args.phantom_spacing,
        )
    return key


def _cache_path(args: TrainGeneratorArguments) -> Path | None:
    if not args.cube_cache:
        return None
    digest = hashlib.sha1(json.dumps(_data_key(args), sort_keys=True).encode()).hexdigest()[:16]
    return Path(args.cube_cache) / f"cubes_{args.task}_{digest}.npz"


def build_dataset(args: TrainGeneratorArguments, samples_per_epoch_multiple: int, progress: bool, workers: int = 1):
    """The task's training cubes from ``--data`` / ``--lidc-root`` / phantoms (made by ``workers``
    processes), or the cube cache."""
    from .cubes import (
        CubeDataset,
        iter_case_folders,
        iter_lidc_root,
        iter_phantom_cases,
        passes_quality_check,
        site_nodule_diameters_mm,
    )

    dataset = None
    cache = _cache_path(args)
    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as stored:
            dataset = CubeDataset.from_cubes(
                stored["cubes_hu"],
                records=json.loads(str(stored["records"])),
                seed=args.seed,
                augment=True,
                shuffle=True,
            )
        logger.info("training cubes from the cache %s", cache)
    if dataset is None:
        source = args.data or args.lidc_root or f"{args.phantoms} synthetic phantoms"
        logger.info("cutting the %s training cubes from %s (minutes per hundred scans)", args.task, source)
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
                task=args.task,
                workers=workers,
                native_spacing=args.phantom_spacing == "native",
            )
        if args.max_scans is not None and (args.data or args.lidc_root):
            cases = itertools.islice(cases, args.max_scans)
        dataset = CubeDataset.from_cases(
            cases, args.task, seed=args.seed, augment=True, shuffle=True, progress=progress
        )
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.stem}.tmp-{os.getpid()}.npz")
            np.savez(tmp, cubes_hu=dataset.cubes_hu, records=np.array(json.dumps(dataset.records)))
            os.replace(tmp, cache)
    if args.only_kept_sites:
        dataset = dataset.subset(passes_quality_check(dataset.cubes_hu, args.task))
    if args.site_diameter_mm is not None:
        low, high = args.site_diameter_mm
        diameters = site_nodule_diameters_mm(dataset.cubes_hu)
        dataset = dataset.subset((diameters >= low) & (diameters <= high), f"measures {low:g}-{high:g} mm")
    multiple = samples_per_epoch_multiple
    dataset.samples_per_epoch = math.ceil(max(len(dataset.cubes_hu), multiple) / multiple) * multiple
    return dataset


# -- training -----------------------------------------------------------------------------------


# voxels (z, y, x) at 1 mm: the Gaussian that takes the slice staircase out of a mask measured on a cube resampled
# from thick slices (its area per axial slice jumps every 1.25-2.5 mm). Drawn unsmoothed, the bank's staircase came
# out in the generated nodules as a spectral peak of 56 (pristine 3.8); smoothed, 7.1 (measured on held-out sites).
STAIRCASE_SIGMA = (2.0, 0.7, 0.7)


def nodule_mask_bank(cubes_hu: np.ndarray, task: str, diameter_mm: Sequence[float] | None = None) -> NoduleMaskBank:
    """The masks of the training nodules that a mask-conditioned pipeline draws from: each cube's nodule as the
    builder's quality check finds it (`m3d.tamper.quality.central_component` of the solid voxels of its centred
    32^3 crop), the slice staircase smoothed out (`STAIRCASE_SIGMA`) and made to fit the hole
    (`m3d.tamper.nodule_shape.fit_mask_in_hole`); those whose size then passes ``task``'s keep rule. The bank draws
    in ``diameter_mm`` (low, high) when a call names no size: ValueError when none of its masks lies there."""
    from scipy import ndimage

    from ..pipelines import NoduleMaskBank
    from ..tamper.nodule_shape import fit_mask_in_hole
    from ..tamper.quality import QualityCriteria, central_component, equivalent_diameter_mm, passes_keep_rule
    from .cubes import center_crop

    criteria = QualityCriteria()
    fitted = [
        fit_mask_in_hole(
            ndimage.gaussian_filter(
                central_component(center_crop(cube) > criteria.threshold_hu, criteria.center_radius_mm).astype(
                    np.float32
                ),
                STAIRCASE_SIGMA,
            )
            > 0.5
        )
        for cube in cubes_hu
    ]
    masks = np.stack([mask for mask in fitted if mask is not None] or [np.zeros((HOLE_SIZE,) * 3, bool)])
    diameters = equivalent_diameter_mm(masks)
    kept = passes_keep_rule(diameters, task)
    if not kept.any():
        raise ValueError(f"no training nodule passes the {task} keep rule: a mask-conditioned pipeline has no masks")
    if diameter_mm is not None:
        low, high = diameter_mm
        if not (kept & (diameters >= low) & (diameters <= high)).any():
            raise ValueError(f"no kept training nodule mask measures {low:g}-{high:g} mm (--nodule-diameter-mm)")
    return NoduleMaskBank.from_masks(masks[kept], diameter_mm)


class GeneratorTraining(TrainingLoop):
    """A generator's run: the task's cubes, the model's `GeneratorTrainer` (networks, optimisers, step, EMA)."""

    arguments: TrainGeneratorArguments
    name = "train_generator"
    unit = "cubes"

    def __init__(self, arguments: TrainGeneratorArguments) -> None:
        from ..data.phantom import phantom_workers

        arguments.check()
        super().__init__(arguments, logger)
        args, accelerator = arguments, self.accelerator
        self.description = f"{args.model} {args.task}"
        # data: every process cuts the same cubes (deterministic); the loader shards the batches
        self.dataset = build_dataset(
            args,
            self.total_batch,
            progress=self.show_progress,
            workers=phantom_workers(args.phantoms, accelerator.num_processes),
        )
        records = self.dataset.records
        logger.info(
            "%d %s sites -> %d cubes per epoch (%s)",
            len(self.dataset.cubes_hu),
            args.task,
            len(self.dataset),
            ", ".join(r["source"] for r in records[:5]) + (" ..." if len(records) > 5 else ""),
        )
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=args.batch_size,
            shuffle=False,  # the dataset orders each epoch from (seed, epoch)
            drop_last=True,
            num_workers=args.num_workers,
            worker_init_fn=ignore_sigint if args.num_workers else None,
            pin_memory=accelerator.device.type == "cuda",
        )
        self.trainer = make_trainer(
            args.model,
            args.task,
            args.preset,
            config_overrides=parse_config_overrides(args.config_overrides),
            learning_rate=args.learning_rate,
            d_learning_rate=args.d_learning_rate,
            lambda_l1=args.lambda_l1,
            hole_only=args.hole_only,
            lambda_cycle=args.lambda_cycle,
            full_cycle_weight=args.full_cycle_weight,
            lambda_spectral=args.lambda_spectral,
            lambda_spectral_peak=args.lambda_spectral_peak,
            ema_decay=args.ema_decay,
            max_grad_norm=args.max_grad_norm,
            prediction_type=args.prediction_type,
            beta_schedule=args.noise_schedule,
            num_train_timesteps=args.num_train_timesteps,
            snr_gamma=args.snr_gamma,
        )
        self.trainer.args = args
        if args.init_from:
            self.trainer.init_from(args.init_from)
        mask_conditioned = self.trainer.pipeline().mask_conditioned
        if args.nodule_diameter_mm is not None and not mask_conditioned:
            raise ValueError(
                "--nodule-diameter-mm sizes the nodules a mask-conditioned network draws; this one sees no nodule mask"
            )
        # the masks the saved pipeline will draw from, made before training so that bad ones stop the run at once
        self.nodule_mask_bank = (
            nodule_mask_bank(self.dataset.cubes_hu, args.task, args.nodule_diameter_mm) if mask_conditioned else None
        )
        self.trainer.prepare(accelerator)
        self.loader = accelerator.prepare(loader)
        self.trainer.train()

    def learning_rate_factor(self, steps_done: int) -> float:
        """The schedule at the optimizer step after ``steps_done``: 1, then falling linearly over the last
        N = ``--lr-decay-steps`` steps to 1/N at the last (CycleGAN's linear decay)."""
        decay, remaining = self.arguments.lr_decay_steps, self.arguments.max_steps - steps_done
        return min(1.0, remaining / decay) if decay else 1.0

    def micro_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.trainer.scale_learning_rates(self.learning_rate_factor(self.global_step))
        with self.accelerator.accumulate(*self.trainer.networks.values()):
            losses = self.trainer.step(batch)
        if self.accelerator.sync_gradients:
            self.trainer.after_optimizer_step()
        return losses

    def training_record(
        self, epoch: int, losses: dict[str, float], steps_per_s: float, elapsed_s: float
    ) -> dict[str, Any]:
        return {
            **losses,
            "step": self.global_step,
            "epoch": epoch,
            "lr": self.trainer.lr * self.learning_rate_factor(self.global_step - 1),  # the step just taken
            "steps_per_s": steps_per_s,
            "elapsed_s": elapsed_s,
        }

    def checkpoint_extras(self, folder: Path) -> dict[str, Any]:
        self.trainer.save_extra(folder)
        args = self.arguments
        return {
            "model": args.model,
            "task": args.task,
            "preset": args.preset,
            "prediction_type": args.prediction_type,
            "noise_schedule": args.noise_schedule,
            "num_train_timesteps": args.num_train_timesteps,
            "ema_decay": self.trainer.ema_decay,
            **self.data_position(),
        }

    def resume_from(self, state: dict[str, Any], folder: Path) -> None:
        for key in ("model", "task", "preset", "prediction_type", "noise_schedule", "num_train_timesteps"):
            if key in state and state[key] != getattr(self.arguments, key):
                flag = key.replace("_", "-")
                raise ValueError(
                    f"checkpoint {folder} was trained with --{flag} {state[key]}; got {getattr(self.arguments, key)}"
                )
        ema_decay = self.trainer.ema_decay
        if state.get("ema_decay", ema_decay) != ema_decay:
            raise ValueError(f"checkpoint {folder} was trained with --ema-decay {state['ema_decay']}; got {ema_decay}")
        self.trainer.load_extra(folder)

    def save_outputs(self) -> None:
        args = self.arguments
        pipeline = self.trainer.pipeline()
        if self.nodule_mask_bank is not None:
            pipeline.register_modules(nodule_mask_bank=self.nodule_mask_bank)
        if args.save_dtype != "fp32":
            for module in pipeline.components.values():
                if isinstance(module, nn.Module) and any(True for _ in module.parameters()):  # not the mask bank
                    module.to(dtype=SAVE_DTYPES[args.save_dtype])
        pipeline_dir = save_pretrained_atomic(pipeline, self.output_dir / "pipeline")
        summary = {
            "model": args.model,
            "task": args.task,
            "preset": args.preset,
            "steps": self.global_step,
            "sites": self.dataset.records,
            "wall_s": round(time.perf_counter() - self.start_time, 3),
            "args": {k: json_value(v) for k, v in asdict(args).items()},
        }
        write_json_atomic(self.output_dir / "training_summary.json", summary)
        logger.info("saved %s pipeline (%s) to %s", args.model, args.task, pipeline_dir)


def train(arguments: TrainGeneratorArguments) -> int:
    """Train a generator as ``arguments`` say: 0 done, 130 stopped (a checkpoint saved); bad input raises."""
    training = GeneratorTraining(arguments)
    return training.run(training.loader, arguments.max_steps)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Entry point (`m3d train-generator` calls it; ``prog`` names it in the usage line): 0 done, 2 bad
    input, 130 interrupted (a checkpoint was saved)."""
    arguments = parse_arguments(argv, prog)
    return run_guarded(
        "train_generator", lambda: train(arguments), (ValueError, FileNotFoundError, NotADirectoryError)
    )


if __name__ == "__main__":
    sys.exit(main())
