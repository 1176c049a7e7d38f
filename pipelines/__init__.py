"""diffusers pipelines of the three M3Dsynth generators, one module each:

* `M3DInpaintPipeline` (``pipeline_m3d_inpaint``): conditional 3-D DDPM with RePaint-style
  known-region consistency; any DDPM / DDIM / DPM-Solver++ scheduler.
* `Pix2Pix3DPipeline` (``pipeline_pix2pix3d``): CT-GAN's 3-D pix2pix generator.
* `CycleGAN3DPipeline` (``pipeline_cyclegan3d``): the masked -> tissue generator of a 3-D CycleGAN.

All take either ``cubes`` (B, 1, 32, 32, 32) in [-1, 1] or a `CTVolume` + LPS locations, and return
`M3DPipelineOutput` (cubes, tampered volumes, changed-voxel masks); their ``__call__`` reads as diffusers':
``check_inputs`` -> ``cube_processor.preprocess`` (`CubeProcessor`) -> the generation loop ->
``cube_processor.postprocess``. The GANs' network is the ``network`` component (``generator`` is the random
generator argument). Each saved folder holds one task's weights (``task`` in ``model_index.json``).
`load_pipeline(path)` picks the class from ``model_index.json`` (and loads folders saved before a component
was renamed, `RENAMED_COMPONENTS`); ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``
loads current folders too, through the one-line ``m3d_pipeline.py`` every saved folder carries (m3d installed).
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import torch
from safetensors import SafetensorError

from ..loading import check_settings, read_json_object, require_safetensors, require_saved_tensors
from .common import (
    PIPELINE_CODE,
    PIPELINE_CODE_MODULE,
    RENAMED_COMPONENTS,
    TASKS,
    CubeProcessor,
    M3DPipelineOutput,
    M3DTamperPipeline,
    pipeline_class_name,
)
from .pipeline_cyclegan3d import CycleGAN3DPipeline
from .pipeline_m3d_inpaint import (
    NUM_TRAIN_TIMESTEPS,
    SAMPLERS,
    M3DInpaintPipeline,
    default_scheduler,
    inference_scheduler,
)
from .nodule_mask_bank import NoduleMaskBank
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
    class_name = pipeline_class_name(entries)
    if class_name not in PIPELINE_CLASSES:
        raise ValueError(f"{index} names pipeline class {class_name!r}; m3d knows {sorted(PIPELINE_CLASSES)}")
    check_settings(
        index, entries, {*inspect.signature(PIPELINE_CLASSES[class_name].__init__).parameters, *RENAMED_COMPONENTS}
    )
    code = folder / f"{PIPELINE_CODE_MODULE}.py"
    if code.is_file() and code.read_text(errors="replace") != PIPELINE_CODE:
        raise ValueError(
            f"{code} is not m3d's own one-line code file, and m3d never runs code a folder brings: "
            "inspect it, and restore it or delete it"
        )
    if "task" not in entries:
        raise ValueError(f"{index} does not say the pipeline's task (inject or remove)")
    for name, value in entries.items():
        if (
            name.startswith("_")
            or not (isinstance(value, list) and len(value) == 2)
            or not str(value[0]).startswith("m3d.")
        ):
            continue
        _check_component(folder / name, value)
    try:
        pipeline = PIPELINE_CLASSES[class_name].from_pretrained(str(path), use_safetensors=True, **kwargs)
        saved_names = {new: old for old, new in RENAMED_COMPONENTS.items() if old in entries}
        for name, component in pipeline.components.items():
            if isinstance(component, torch.nn.Module):
                require_saved_tensors(component, next((folder / saved_names.get(name, name)).glob("*.safetensors")))
        return pipeline
    except SafetensorError as error:
        raise ValueError(f"{folder}: a component's weights are truncated or not safetensors ({error})") from None
    except OSError as error:
        raise ValueError(
            f"{folder}: a component's weights cannot be read, truncated or not safetensors ({error})"
        ) from None
    except ValueError as error:
        if "shape" not in str(error):
            raise
        raise ValueError(
            f"{folder}: weights that do not fit their config.json ({str(error).split('. ')[0]})"
        ) from None


def _check_component(component: Path, library_and_class: list[str]) -> None:
    """A model component folder holds the config of the class ``model_index.json`` names for it (with
    no setting the class does not take) and its safetensors weights."""
    config = component / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{component} has no config.json: the pipeline folder is incomplete")
    module_name, class_name = library_and_class
    settings = read_json_object(config)
    if settings.get("_class_name") != class_name:
        raise ValueError(f"{component} holds a {settings.get('_class_name')}, but model_index.json names {class_name}")
    try:
        component_class = getattr(importlib.import_module(module_name), class_name, None)
    except ImportError:
        component_class = None
    if component_class is None:
        raise ValueError(
            f"{component.parent / 'model_index.json'} names {module_name}.{class_name}, which m3d does not have"
        )
    check_settings(config, settings, inspect.signature(component_class.__init__).parameters)
    require_safetensors(component)


__all__ = [
    "NUM_TRAIN_TIMESTEPS",
    "PIPELINE_CLASSES",
    "RENAMED_COMPONENTS",
    "SAMPLERS",
    "TASKS",
    "CubeProcessor",
    "CycleGAN3DPipeline",
    "M3DInpaintPipeline",
    "M3DPipelineOutput",
    "M3DTamperPipeline",
    "NoduleMaskBank",
    "Pix2Pix3DPipeline",
    "default_scheduler",
    "inference_scheduler",
    "load_pipeline",
]
