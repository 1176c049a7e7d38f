"""`CycleGAN3DPipeline`: M3Dsynth's CycleGAN generator, which fills the masked centre of a 32 mm CT
cube with the masked -> tissue generator G (`CycleGAN3DGenerator`), in one forward pass.

Training uses both directions (G: masked -> filled, F: filled -> masked, two PatchGAN discriminators,
cycle-consistency losses); as in the paper only G is used at inference, so only G is a component.
The generator sees the cube with its centre hole set to 0 (``in_channels=1``) or that plus the hole
mask (``in_channels=2``). The network is deterministic (no dropout, InstanceNorm); ``generator`` seeds
the touch-ups' noise. ``keep_context`` and the touch-ups as in `Pix2Pix3DPipeline`.

One task per folder: ``task`` ("inject" | "remove") is recorded in ``model_index.json``.
"""
from __future__ import annotations

import numpy as np
import torch

from ..data.ct import CTVolume
from ..models.cyclegan3d import CycleGAN3DGenerator
from .common import GeneratorArg, M3DTamperPipeline, check_task_name

__all__ = ["CycleGAN3DPipeline"]


class CycleGAN3DPipeline(M3DTamperPipeline):
    """Fill the centre hole of 32^3 CT cubes with a 3-D CycleGAN generator (see module doc).

    Args:
        generator: the trained masked -> tissue `CycleGAN3DGenerator` (G).
        task: ``"inject"`` or ``"remove"``: what the weights were trained for.
    """

    model_cpu_offload_seq = "generator"

    def __init__(self, generator: CycleGAN3DGenerator, task: str = "inject"):
        super().__init__()
        self.register_modules(generator=generator)
        self.register_to_config(task=check_task_name(task))

    @classmethod
    def from_preset(cls, preset: str = "default", task: str = "inject", **overrides) -> "CycleGAN3DPipeline":
        """A randomly initialised pipeline with a `m3d.models.PRESETS` generator."""
        from ..models import PRESETS

        return cls(generator=CycleGAN3DGenerator(**{**PRESETS["CycleGAN3DGenerator"][preset], **overrides}), task=task)

    def __call__(
        self,
        cubes: np.ndarray | torch.Tensor | None = None,
        *,
        volume: CTVolume | None = None,
        locations_lps_mm=None,
        task: str | None = None,
        num_inference_steps: int | None = None,
        generator: GeneratorArg = None,
        output_type: str = "np",
        batch_size: int = 16,
        progress: bool = True,
        lung_mask: np.ndarray | None = None,
        allow_outside_lung: bool = False,
        return_dict: bool = True,
        keep_context: bool = True,
        touch_up: bool | None = None,
    ):
        """Same arguments as `M3DInpaintPipeline.__call__` (``num_inference_steps`` is accepted for a
        uniform API and ignored), plus ``keep_context`` and ``touch_up`` as in `Pix2Pix3DPipeline`."""
        network = self.generator

        def fill(original: torch.Tensor, mask: torch.Tensor, generators: list, on_step) -> torch.Tensor:
            masked = original * (1.0 - mask)
            inputs = masked if network.config.in_channels == 1 else torch.cat([masked, mask], dim=1)
            output = network(inputs.to(network.dtype)).sample
            on_step()
            return output.to(torch.float32)

        return self._run(
            fill,
            1,
            cubes=cubes,
            volume=volume,
            locations_lps_mm=locations_lps_mm,
            task=task,
            generator=generator,
            output_type=output_type,
            batch_size=batch_size,
            progress=progress,
            lung_mask=lung_mask,
            allow_outside_lung=allow_outside_lung,
            return_dict=return_dict,
            keep_context=keep_context,
            touch_up=keep_context if touch_up is None else touch_up,
        )
