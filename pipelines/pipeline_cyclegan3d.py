"""`CycleGAN3DPipeline`: M3Dsynth's CycleGAN generator, which fills the masked centre of a 32 mm CT
cube with the masked -> tissue generator G (a `CycleGAN3DGenerator`, the pipeline's network), in one
forward pass.

Training uses both directions (G: masked -> filled, F: filled -> masked, two PatchGAN discriminators,
cycle-consistency losses); as in the paper only G is used at inference, so only G is a component.
The network sees the cube with its centre hole set to 0 (``in_channels=1``) or that plus the hole
mask (``in_channels=2``), or also the mask of the nodule to draw (``in_channels=3``, as LeFusion conditions on a
lesion mask: ``nodule_masks``, or one drawn per cube, `m3d.tamper.nodule_shape`). It is deterministic (InstanceNorm,
dropout off) unless the folder says otherwise: ``stochastic=True`` keeps the residual blocks' dropout on when it
generates (a network trained with ``dropout > 0``; pix2pix's test-time noise, as `Pix2Pix3DPipeline`), seeded by
``generator`` (one stream per cube). ``generator`` also seeds the drawn nodule masks and the touch-ups' noise.
``keep_context`` and the touch-ups as in `Pix2Pix3DPipeline`.

One task per folder: ``task`` ("inject" | "remove") is recorded in ``model_index.json``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..data.ct import CTVolume
from ..models.cyclegan3d import CycleGAN3DGenerator
from .common import (
    GeneratorArg,
    M3DPipelineOutput,
    M3DTamperPipeline,
    check_task_name,
    per_sample_generators,
)
from .nodule_mask_bank import NoduleMaskBank

__all__ = ["CycleGAN3DPipeline"]


class CycleGAN3DPipeline(M3DTamperPipeline):
    """Fill the centre hole of 32^3 CT cubes with a 3-D CycleGAN's masked -> tissue network (see module doc).

    Args:
        network: the trained masked -> tissue `CycleGAN3DGenerator` (G), saved as the ``network`` component
            (folders saved before call it ``generator`` and still load).
        task: ``"inject"`` or ``"remove"``: what the weights were trained for.
        nodule_mask_bank: a mask-conditioned network's training nodule masks (`NoduleMaskBank`), drawn from when a
            call gives no ``nodule_masks``.
        stochastic: the default of the call's ``stochastic`` (the residual blocks' dropout at inference).
    """

    model_cpu_offload_seq = "network"

    def __init__(
        self,
        network: CycleGAN3DGenerator,
        task: str = "inject",
        nodule_mask_bank: NoduleMaskBank | None = None,
        stochastic: bool = False,
    ):
        super().__init__()
        self.register_modules(network=network, nodule_mask_bank=nodule_mask_bank)
        self.register_to_config(task=check_task_name(task), stochastic=bool(stochastic))

    @classmethod
    def from_preset(cls, preset: str = "default", task: str = "inject", **overrides: Any) -> "CycleGAN3DPipeline":
        """A randomly initialised pipeline with a `CycleGAN3DGenerator.presets` network (``overrides`` on top)."""
        return cls(network=CycleGAN3DGenerator.from_preset(preset, **overrides), task=task)

    @torch.no_grad()
    def __call__(
        self,
        cubes: np.ndarray | torch.Tensor | None = None,
        *,
        volume: CTVolume | None = None,
        locations_lps_mm: Any = None,
        task: str | None = None,
        generator: GeneratorArg = None,
        output_type: str = "np",
        batch_size: int = 16,
        progress: bool = True,
        lung_mask: np.ndarray | None = None,
        allow_outside_lung: bool = False,
        return_dict: bool = True,
        stochastic: bool | None = None,
        keep_context: bool = True,
        touch_up: bool | None = None,
        nodule_masks: np.ndarray | torch.Tensor | None = None,
        nodule_diameter_mm: float | tuple[float, float] | None = None,
    ) -> M3DPipelineOutput | tuple:
        """Fill the centre hole of ``cubes``, or of 32 mm cubes cut from ``volume``, in one forward pass.

        Args:
            cubes: ``(B, 1, 32, 32, 32)`` (or ``(B, 32, 32, 32)``) cubes in [-1, 1] (HU scaled with
                `m3d.tamper.cube.hu_to_unit`); the hole is masked here, its content is ignored.
            volume, locations_lps_mm: instead of cubes, a `CTVolume` and one or ``(N, 3)`` LPS
                ``(x, y, z)`` mm centres; cubes are cut with `extract_cube` (bad locations raise
                `TamperLocationError` before anything is generated) and pasted back one after another.
            task: optional check that the weights were trained for this task.
            generator: a `torch.Generator` (seeds one generator per cube, for the dropout and the touch-ups: same
                seed -> same cubes, whatever ``batch_size``), a list of one per cube, or None (torch's global RNG).
            output_type: ``"np"``, ``"pt"`` or ``"volume"`` (requires ``volume``).
            batch_size: cubes per forward pass.
            progress: show a progress bar (one step per batch).
            lung_mask, allow_outside_lung: passed to `extract_cube` (the lungs are segmented once when no
                mask is given).
            return_dict: return `M3DPipelineOutput` (else a tuple ``(cubes, volumes, masks)``).
            stochastic: the residual blocks' dropout on, seeded by ``generator`` (None: the folder's
                ``config.stochastic``); a network without dropout is the same either way.
            keep_context: replace only the hole (else keep the whole generated cube).
            touch_up: CT-GAN's touch-ups (`m3d.tamper.touch_up`): the scan's noise on the generated hole and
                a blend into the original; None (the default) = ``keep_context``, which they need.
            nodule_masks: for a mask-conditioned network (``in_channels=3``), where to draw the nodule in each cube:
                ``(B, [1,] 32, 32, 32)``, nonzero inside the nodule (its part in the hole counts). None: one mask per
                cube drawn from the cube's generator (`m3d.tamper.nodule_shape.random_nodule_mask`).
            nodule_diameter_mm: the drawn masks' equivalent diameter (mm): one value or a ``(low, high)`` range
                (None: the task's `m3d.constants.TARGET_NODULE_DIAMETER_MM`).

        Returns:
            `M3DPipelineOutput` (or the tuple): the cubes, and with a scan the tampered scan and the mask of
            the voxels that changed.
        """
        touch_up = keep_context if touch_up is None else touch_up
        stochastic = self.config.stochastic if stochastic is None else stochastic
        # 1. Check inputs
        self.check_inputs(
            cubes, volume, locations_lps_mm, task, output_type, batch_size, keep_context, touch_up,
            nodule_masks, self.mask_conditioned,
        )  # fmt: skip

        # 2. Preprocess: cut each site's cube at 1 mm, scale the HU window to [-1, 1], mask the hole
        inputs = self.cube_processor.preprocess(
            cubes, volume, locations_lps_mm, lung_mask=lung_mask, allow_outside_lung=allow_outside_lung
        )
        generators = per_sample_generators(generator, len(inputs))
        if self.mask_conditioned:  # the nodule to draw in each cube: given, or drawn from the cube's generator
            inputs = self.cube_processor.nodule_masks(
                inputs, self.task, generators, nodule_masks, nodule_diameter_mm, self.nodule_mask_bank
            )

        # 3. One forward pass per batch
        filled = []
        with self._generating(progress):
            for batch in self.progress_bar(inputs.batches(batch_size, generators, self._execution_device)):
                network_input = batch.condition(self.network.config.in_channels).to(self.network.dtype)
                dropout_generator = batch.generators if stochastic else None
                filled.append(self.network(network_input, dropout_generator=dropout_generator).sample)

        # 4. Postprocess: keep the known region, touch up, paste back
        output = self.cube_processor.postprocess(
            inputs,
            torch.cat(filled),
            task=self.task,
            generators=generators,
            keep_context=keep_context,
            touch_up=touch_up,
            output_type=output_type,
        )
        self.maybe_free_model_hooks()
        if not return_dict:
            return output.cubes, output.volumes, output.masks
        return output
