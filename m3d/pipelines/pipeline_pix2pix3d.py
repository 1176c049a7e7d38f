"""`Pix2Pix3DPipeline`: M3Dsynth's "pix2pix" generator, i.e. CT-GAN's 3-D conditional GAN, which
fills the masked centre of a 32 mm CT cube in one forward pass of `Pix2Pix3DGenerator`.

The generator sees the cube with its 20^3 centre hole set to 0 (``in_channels=1``, as CT-GAN) or that
plus the hole mask (``in_channels=2``). Inference is deterministic by default (CT-GAN runs Keras'
``predict``, dropout off); ``stochastic=True`` turns on pix2pix's test-time dropout, seeded by
``generator`` (one stream per cube). By default only the hole is replaced (``keep_context=True``):
the rest of the cube stays the scan's own voxels; ``keep_context=False`` keeps the whole generated
cube, as CT-GAN pastes it (the paste then blends it in). With the context kept, CT-GAN's touch-ups
(`m3d.tamper.touch_up`) are applied by default: noise with the grain of the cube's own scanner noise on
the generated hole, seeded by ``generator``, and a blend into the original instead of a hard paste.

One task per folder: ``task`` ("inject" | "remove") is recorded in ``model_index.json``; the
injector is trained on malignant nodules > 10 mm, the remover on benign nodules < 8 mm.
"""
from __future__ import annotations

import numpy as np
import torch

from ..data.ct import CTVolume
from ..models.pix2pix3d import Pix2Pix3DGenerator
from .common import GeneratorArg, M3DTamperPipeline, check_task_name

__all__ = ["Pix2Pix3DPipeline"]


class Pix2Pix3DPipeline(M3DTamperPipeline):
    """Fill the centre hole of 32^3 CT cubes with CT-GAN's 3-D pix2pix generator (see module doc).

    Args:
        generator: the trained `Pix2Pix3DGenerator`.
        task: ``"inject"`` or ``"remove"``: what the weights were trained for.
    """

    model_cpu_offload_seq = "generator"

    def __init__(self, generator: Pix2Pix3DGenerator, task: str = "inject"):
        super().__init__()
        self.register_modules(generator=generator)
        self.register_to_config(task=check_task_name(task))

    @classmethod
    def from_preset(cls, preset: str = "default", task: str = "inject", **overrides) -> "Pix2Pix3DPipeline":
        """A randomly initialised pipeline with a `m3d.models.PRESETS` generator."""
        from ..models import PRESETS

        return cls(generator=Pix2Pix3DGenerator(**{**PRESETS["Pix2Pix3DGenerator"][preset], **overrides}), task=task)

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
        stochastic: bool = False,
        keep_context: bool = True,
        touch_up: bool | None = None,
    ):
        """Same arguments as `M3DInpaintPipeline.__call__` (``num_inference_steps`` is accepted for a
        uniform API and ignored: one forward pass), plus ``stochastic`` (seeded test-time dropout) and
        ``keep_context`` (replace only the hole) and ``touch_up`` (CT-GAN's touch-ups,
        `m3d.tamper.touch_up`: the scan's noise on the generated hole and a blend into the original; None,
        the default, = ``keep_context``)."""
        network = self.generator

        def fill(original: torch.Tensor, mask: torch.Tensor, generators: list, on_step) -> torch.Tensor:
            masked = original * (1.0 - mask)
            inputs = masked if network.config.in_channels == 1 else torch.cat([masked, mask], dim=1)
            output = network(inputs.to(network.dtype), dropout_generator=generators if stochastic else None).sample
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
