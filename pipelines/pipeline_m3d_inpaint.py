"""`M3DInpaintPipeline`: the M3Dsynth diffusion generator — a conditional 3-D DDPM that inpaints the
masked centre of a 32 mm CT cube.

The denoiser (`m3d.models.unet3d.UNet3DModel`) sees ``concat(x_t, masked cube, hole mask)``: the
masked cube is an extra input channel, as in the paper. A UNet with ``in_channels=4`` also sees the mask of the
nodule to draw (as LeFusion conditions its lesion inpainting on a lesion mask): ``nodule_masks``, or one drawn per
cube from its generator (`m3d.tamper.nodule_shape`), as in the mask-conditioned GAN pipelines.

Sampling adds RePaint-style known-region consistency: after every scheduler step the voxels outside the hole
are replaced by the original cube forward-noised to the step's target timestep
(``scheduler.add_noise(original, noise, t_prev)``), and after the last step by the exact original, so the
output equals the input outside the hole.

Schedulers: any diffusers scheduler with ``set_timesteps`` / ``step`` / ``add_noise`` —
`DDPMScheduler` (the training schedule; slow), `DDIMScheduler` (``eta`` is passed through) and
`DPMSolverMultistepScheduler` (``algorithm_type="dpmsolver++"``; 20-50 steps) are tested. Swap with
``pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)``, ``from_pretrained(path,
scheduler=...)`` or ``M3DInpaintPipeline.from_pipe(pipe, scheduler=...)``.

The default training schedule (`default_scheduler`) is the paper's: 2,000 linear steps
(beta 1e-4 -> 0.02), epsilon prediction, samples clipped to [-1, 1]. The scheduler saved with a
pipeline carries its own schedule and ``prediction_type`` (the demo recipe of
`m3d.train.demo_pipelines` trains v-prediction on a 1,000-step cosine schedule), and the loop below
works for any of them: the UNet's output is handed to
``scheduler.step``, which reads it as the schedule says.

One task per pipeline folder: injection weights are trained on malignant nodules > 10 mm, removal
weights on benign nodules < 8 mm (as the paper); the folder records ``task`` in ``model_index.json``
and a call with another ``task`` fails. A single task-conditioned model would be an extension.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from ..data.ct import CTVolume
from ..models.unet3d import UNet3DModel
from .common import (
    NODULE_MASK_CHANNELS,
    GeneratorArg,
    M3DPipelineOutput,
    M3DTamperPipeline,
    check_task_name,
    per_sample_generators,
)
from .nodule_mask_bank import NoduleMaskBank

__all__ = [
    "M3DInpaintPipeline",
    "default_scheduler",
    "inference_scheduler",
    "NUM_TRAIN_TIMESTEPS",
    "SAMPLERS",
    "PREDICTION_TYPES",
    "BETA_SCHEDULES",
]

NUM_TRAIN_TIMESTEPS = 2000  # M3Dsynth's DDPM: 2,000-step linear schedule
SAMPLERS = ("ddpm", "ddim", "dpmsolver++")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "squaredcos_cap_v2")


def default_scheduler(
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, prediction_type: str = "epsilon", beta_schedule: str = "linear"
) -> DDPMScheduler:
    """The training/noising schedule. Defaults: the M3Dsynth DDPM's, linear betas 1e-4 -> 0.02 over
    2,000 steps, epsilon prediction. ``prediction_type`` ``"v_prediction"`` or ``"sample"`` and
    ``beta_schedule="squaredcos_cap_v2"`` (the cosine schedule of Nichol & Dhariwal 2021) are the
    demo's CPU recipe (see `m3d.train.train_generator`)."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}; got {prediction_type!r}")
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}; got {beta_schedule!r}")
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        beta_start=1e-4,
        beta_end=0.02,
        prediction_type=prediction_type,
        clip_sample=True,
        clip_sample_range=1.0,
        variance_type="fixed_small",
    )


def inference_scheduler(name: str = "ddpm", training_scheduler: SchedulerMixin | None = None) -> SchedulerMixin:
    """A sampler on ``training_scheduler``'s schedule (default: `default_scheduler`): ``"ddpm"``,
    ``"ddim"`` or ``"dpmsolver++"`` (`DPMSolverMultistepScheduler`, 20-50 steps)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    config = (training_scheduler or default_scheduler()).config
    if name == "ddpm":
        return DDPMScheduler.from_config(config)
    if name == "ddim":
        return DDIMScheduler.from_config(config, timestep_spacing="trailing")
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", timestep_spacing="trailing"
        )
    raise ValueError(f"sampler must be one of {SAMPLERS}; got {name!r}")


class M3DInpaintPipeline(M3DTamperPipeline):
    """Fill the centre hole of 32^3 CT cubes with a conditional 3-D DDPM (see module doc).

    Args:
        unet: the `UNet3DModel` denoiser (``in_channels=3``: noisy cube, masked cube, hole mask; 4: and the mask of
            the nodule to draw).
        scheduler: a diffusers scheduler (default training schedule: `default_scheduler`).
        task: ``"inject"`` or ``"remove"``: what the weights were trained for.
        num_inference_steps: the sampling steps a call uses when it names none: what these weights
            and this scheduler were checked with (saved in ``model_index.json``).
        nodule_mask_bank: a mask-conditioned UNet's training nodule masks (`NoduleMaskBank`), drawn from when a
            call gives no ``nodule_masks``.
    """

    model_cpu_offload_seq = "unet"

    def __init__(
        self,
        unet: UNet3DModel,
        scheduler: SchedulerMixin,
        task: str = "inject",
        num_inference_steps: int = 50,
        nodule_mask_bank: NoduleMaskBank | None = None,
    ):
        super().__init__()
        if unet.config.in_channels not in (3, 1 + NODULE_MASK_CHANNELS):
            raise ValueError(
                "the inpainting UNet takes 3 channels (noisy, masked, hole mask) or 4 (and the nodule mask); got "
                f"{unet.config.in_channels}"
            )
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be positive; got {num_inference_steps}")
        self.register_modules(unet=unet, scheduler=scheduler, nodule_mask_bank=nodule_mask_bank)
        self.register_to_config(task=check_task_name(task), num_inference_steps=int(num_inference_steps))

    @classmethod
    def from_preset(cls, preset: str = "default", task: str = "inject", **unet_overrides) -> "M3DInpaintPipeline":
        """A randomly initialised pipeline with a `UNet3DModel.presets` UNet ("reference", "default", "demo",
        "tiny") and the default 2,000-step scheduler — the starting point of training."""
        unet = UNet3DModel.from_preset(preset, **unet_overrides)
        return cls(unet=unet, scheduler=default_scheduler(), task=task)

    @torch.no_grad()
    def __call__(
        self,
        cubes: np.ndarray | torch.Tensor | None = None,
        *,
        volume: CTVolume | None = None,
        locations_lps_mm: Any = None,
        task: str | None = None,
        num_inference_steps: int | None = None,
        eta: float = 0.0,
        generator: GeneratorArg = None,
        output_type: str = "np",
        batch_size: int = 16,
        progress: bool = True,
        lung_mask: np.ndarray | None = None,
        allow_outside_lung: bool = False,
        return_dict: bool = True,
        touch_up: bool = True,
        nodule_masks: np.ndarray | torch.Tensor | None = None,
        nodule_diameter_mm: float | tuple[float, float] | None = None,
    ) -> M3DPipelineOutput | tuple:
        """Inpaint the centre hole of ``cubes`` or of 32 mm cubes cut from ``volume``.

        Args:
            cubes: ``(B, 1, 32, 32, 32)`` (or ``(B, 32, 32, 32)``) cubes in [-1, 1] (HU scaled with
                `m3d.tamper.cube.hu_to_unit`); the hole is masked here, its content is ignored.
            volume, locations_lps_mm: instead of cubes, a `CTVolume` and one or ``(N, 3)`` LPS
                ``(x, y, z)`` mm centres; cubes are cut with `extract_cube` (bad locations raise
                `TamperLocationError` before anything is generated), filled in batches and pasted
                back one after another.
            task: optional check that the weights were trained for this task.
            num_inference_steps: scheduler steps (DDPM needs many; DDIM / DPM-Solver++ 20-50); None:
                the pipeline's own ``config.num_inference_steps``.
            eta: DDIM's eta (ignored by schedulers without it).
            generator: a `torch.Generator` (seeds one generator per cube: same seed -> same cubes,
                whatever ``batch_size``), a list of one per cube, or None (torch's global RNG).
            output_type: ``"np"``, ``"pt"`` or ``"volume"`` (requires ``volume``).
            batch_size: cubes per denoiser batch.
            progress: show a progress bar (one per batch, one step per timestep).
            lung_mask, allow_outside_lung: passed to `extract_cube` (the lungs are segmented once
                when no mask is given).
            return_dict: return `M3DPipelineOutput` (else a tuple ``(cubes, volumes, masks)``).
            touch_up: CT-GAN's touch-ups (`m3d.tamper.touch_up`), on by default as in the GAN pipelines:
                the sampler fits the hole to the known region at every step, yet the raw fills leave a seam
                (measured on held-out sites: 1.48-1.62, pristine 0.96-1.05; 0.87-1.02 with them).
            nodule_masks, nodule_diameter_mm: for a mask-conditioned UNet (``in_channels=4``), the nodule to draw in
                each cube, as in `Pix2Pix3DPipeline`: given masks, or masks drawn from the cubes' generators (of this
                diameter, mm, one value or a range; None: the task's `m3d.constants.TARGET_NODULE_DIAMETER_MM`).

        Returns:
            `M3DPipelineOutput` (or the tuple): the cubes (equal to the input outside the hole), and with a
            scan the tampered scan and the mask of the voxels that changed.
        """
        if num_inference_steps is None:
            num_inference_steps = self.config.get("num_inference_steps", 50)  # folders saved before the key
        # 1. Check inputs
        condition_channels = self.unet.config.in_channels - 1  # what the UNet sees besides the noisy cube
        self.check_inputs(
            cubes, volume, locations_lps_mm, task, output_type, batch_size, touch_up=touch_up,
            nodule_masks=nodule_masks, mask_conditioned=self.mask_conditioned,
        )  # fmt: skip
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be positive; got {num_inference_steps}")

        # 2. Preprocess: cut each site's cube at 1 mm, scale the HU window to [-1, 1], mask the hole
        inputs = self.cube_processor.preprocess(
            cubes, volume, locations_lps_mm, lung_mask=lung_mask, allow_outside_lung=allow_outside_lung
        )
        generators = per_sample_generators(generator, len(inputs))
        if self.mask_conditioned:  # the nodule to draw in each cube: given, or drawn
            inputs = self.cube_processor.nodule_masks(
                inputs, self.task, generators, nodule_masks, nodule_diameter_mm, self.nodule_mask_bank
            )

        # 3. Denoise each batch; after every step the known region is the original noised to the step's target
        #    timestep (RePaint), after the last the exact original
        filled = []
        with self._generating(progress):
            for batch in inputs.batches(batch_size, generators, self._execution_device):
                self.scheduler.set_timesteps(num_inference_steps, device=batch.cubes.device)
                timesteps = self.scheduler.timesteps
                condition = batch.condition(channels=condition_channels)
                extra_step_kwargs = self.prepare_extra_step_kwargs(batch.generators, eta)

                sample = randn_tensor(
                    batch.cubes.shape, generator=batch.generators, device=batch.cubes.device, dtype=torch.float32
                )
                sample = sample * self.scheduler.init_noise_sigma
                sample = batch.hole_mask * sample + batch.known_mask * self.noised(
                    batch.cubes, timesteps[0], batch.generators
                )
                for i, t in enumerate(self.progress_bar(timesteps)):
                    model_input = torch.cat([self.scheduler.scale_model_input(sample, t), condition], dim=1)
                    model_output = self.unet(model_input.to(self.unet.dtype), t.expand(len(sample))).sample.float()
                    sample = self.scheduler.step(model_output, t, sample, **extra_step_kwargs).prev_sample
                    if i + 1 < len(timesteps):
                        known = self.noised(batch.cubes, timesteps[i + 1], batch.generators)
                    else:
                        known = batch.cubes
                    sample = batch.hole_mask * sample + batch.known_mask * known
                filled.append(sample)

        # 4. Postprocess: touch up, paste back
        output = self.cube_processor.postprocess(
            inputs,
            torch.cat(filled),
            task=self.task,
            generators=generators,
            touch_up=touch_up,
            output_type=output_type,
        )
        self.maybe_free_model_hooks()
        if not return_dict:
            return output.cubes, output.volumes, output.masks
        return output

    def noised(self, cubes: torch.Tensor, timestep: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """``cubes`` forward-noised to ``timestep`` with the scheduler, one noise draw per cube's generator."""
        noise = randn_tensor(cubes.shape, generator=generators, device=cubes.device, dtype=torch.float32)
        return self.scheduler.add_noise(cubes, noise, timestep.repeat(len(cubes)))

    def prepare_extra_step_kwargs(self, generators: list[torch.Generator], eta: float) -> dict[str, Any]:
        """The ``scheduler.step`` arguments this scheduler takes: DDIM's ``eta``, the generators of samplers that
        draw noise (not all schedulers have the same signature)."""
        parameters = inspect.signature(self.scheduler.step).parameters
        extra_step_kwargs: dict[str, Any] = {}
        if "eta" in parameters:
            extra_step_kwargs["eta"] = eta
        if "generator" in parameters:
            extra_step_kwargs["generator"] = generators
        return extra_step_kwargs
