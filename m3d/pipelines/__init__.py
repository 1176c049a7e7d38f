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

from pathlib import Path

from ..loading import read_json_object, require_safetensors
from .common import TASKS, M3DPipelineOutput, M3DTamperPipeline
from .pipeline_cyclegan3d import CycleGAN3DPipeline
from .pipeline_m3d_inpaint import NUM_TRAIN_TIMESTEPS, SAMPLERS, M3DInpaintPipeline, default_scheduler, inference_scheduler
from .pipeline_pix2pix3d import Pix2Pix3DPipeline

PIPELINE_CLASSES: dict[str, type[M3DTamperPipeline]] = {
    cls.__name__: cls for cls in (M3DInpaintPipeline, Pix2Pix3DPipeline, CycleGAN3DPipeline)
}


def load_pipeline(path: str | Path, **kwargs) -> M3DTamperPipeline:
    """Load a saved m3d pipeline folder with the class named in its ``model_index.json``
    (``kwargs`` go to ``from_pretrained``: ``torch_dtype``, ``scheduler``, ...). Weights are read from
    safetensors only; a folder that is not a whole, consistent pipeline is one clear error naming it
    (a component of another class, missing or truncated weights, weights that do not fit their config)."""
    folder = Path(path)
    index = folder / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{index} not found: not a saved pipeline folder")
    entries = read_json_object(index)
    class_name = entries.get("_class_name")
    if class_name not in PIPELINE_CLASSES:
        raise ValueError(f"{index} names pipeline class {class_name!r}; m3d knows {sorted(PIPELINE_CLASSES)}")
    for name, value in entries.items():
        if name.startswith("_") or not (isinstance(value, list) and len(value) == 2) or not str(value[0]).startswith("m3d."):
            continue
        _check_component(folder / name, value[1])
    try:
        return PIPELINE_CLASSES[class_name].from_pretrained(str(path), use_safetensors=True, **kwargs)
    except OSError as error:
        raise ValueError(f"{folder}: a component's weights cannot be read, truncated or not safetensors ({error})") from None
    except ValueError as error:
        if "shape" not in str(error):
            raise
        raise ValueError(f"{folder}: weights that do not fit their config.json ({str(error).split('. ')[0]})") from None


def _check_component(component: Path, class_name: str) -> None:
    """A model component folder holds ``class_name``'s config and its safetensors weights."""
    config = component / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{component} has no config.json: the pipeline folder is incomplete")
    saved_class = read_json_object(config).get("_class_name")
    if saved_class != class_name:
        raise ValueError(f"{component} holds a {saved_class}, but model_index.json names {class_name}")
    require_safetensors(component)


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
