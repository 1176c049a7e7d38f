"""diffusers pipelines of the three M3Dsynth generators, one module each:

* `M3DInpaintPipeline` (``pipeline_m3d_inpaint``): conditional 3-D DDPM with RePaint-style
  known-region consistency; any DDPM / DDIM / DPM-Solver++ scheduler.
* `Pix2Pix3DPipeline` (``pipeline_pix2pix3d``): CT-GAN's 3-D pix2pix generator.
* `CycleGAN3DPipeline` (``pipeline_cyclegan3d``): the masked -> tissue generator of a 3-D CycleGAN.

All take either ``cubes`` (B, 1, 32, 32, 32) in [-1, 1] or a `CTVolume` + LPS locations, and return
`M3DPipelineOutput` (cubes, tampered volumes, changed-voxel masks). Each saved folder holds one
task's weights (``task`` in ``model_index.json``). `load_pipeline(path)` picks the class from
``model_index.json``. Reload with the class's ``from_pretrained`` (not ``DiffusionPipeline``'s).
"""
from __future__ import annotations

import json
from pathlib import Path

from .common import TASKS, M3DPipelineOutput, M3DTamperPipeline
from .pipeline_cyclegan3d import CycleGAN3DPipeline
from .pipeline_m3d_inpaint import NUM_TRAIN_TIMESTEPS, SAMPLERS, M3DInpaintPipeline, default_scheduler, inference_scheduler
from .pipeline_pix2pix3d import Pix2Pix3DPipeline

PIPELINE_CLASSES: dict[str, type[M3DTamperPipeline]] = {
    cls.__name__: cls for cls in (M3DInpaintPipeline, Pix2Pix3DPipeline, CycleGAN3DPipeline)
}


def load_pipeline(path: str | Path, **kwargs) -> M3DTamperPipeline:
    """Load a saved m3d pipeline folder with the class named in its ``model_index.json``
    (``kwargs`` go to ``from_pretrained``: ``torch_dtype``, ``scheduler``, ...)."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{index} not found: not a saved pipeline folder")
    class_name = json.loads(index.read_text()).get("_class_name")
    if class_name not in PIPELINE_CLASSES:
        raise ValueError(f"{index} names pipeline class {class_name!r}; m3d knows {sorted(PIPELINE_CLASSES)}")
    return PIPELINE_CLASSES[class_name].from_pretrained(str(path), **kwargs)


__all__ = [
    "NUM_TRAIN_TIMESTEPS",
    "PIPELINE_CLASSES",
    "SAMPLERS",
    "TASKS",
    "CycleGAN3DPipeline",
    "M3DInpaintPipeline",
    "M3DPipelineOutput",
    "M3DTamperPipeline",
    "Pix2Pix3DPipeline",
    "default_scheduler",
    "inference_scheduler",
    "load_pipeline",
]
