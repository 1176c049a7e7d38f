"""What the three m3d tampering pipelines share: the output class, the task check, input handling
(cubes or a scan + locations), per-sample random generators, batching, and pasting back into the scan.

Each pipeline only supplies how one batch of masked cubes is filled (`M3DTamperPipeline._run`'s
``fill`` callback); everything else — extraction with `m3d.tamper.cube`, the [-1, 1] scaling, the
known region, the paste, the progress bar — is here so that the three behave identically.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from ..constants import TASKS
from ..data.ct import CTVolume
from ..data.lungs import segment_lungs
from ..tamper.cube import CUBE_SIZE, extract_cube, hole_mask, hu_to_unit, paste_cube, unit_to_hu
from ..tamper.touch_up import touch_up as touch_up_cube

OUTPUT_TYPES = ("np", "pt", "volume")

GeneratorArg = torch.Generator | Sequence[torch.Generator] | None
# fill(original (b,1,32,32,32) float32 in [-1, 1], mask (b,1,32,32,32) float32 1 = hole,
#      generators: list of b torch.Generator, on_step: callable) -> filled (b,1,32,32,32) float32
FillFn = Callable[[torch.Tensor, torch.Tensor, list, Callable[[], None]], torch.Tensor]


@dataclass
class M3DPipelineOutput(BaseOutput):
    """Output of the m3d tampering pipelines.

    Args:
        cubes: the generated cubes ``(N, 1, 32, 32, 32)`` in [-1, 1] (HU window `HU_WINDOW`), numpy
            float32 (``output_type="np"``/``"volume"``) or a torch tensor (``"pt"``). With the known
            region kept (always for the DDPM), the voxels outside the centre hole equal the input.
        volumes: with a scan as input: ``[tampered CTVolume]`` (every location pasted in turn);
            otherwise None.
        masks: with a scan: ``[bool (z, y, x) mask of the voxels that changed]``, aligned with
            ``volumes``; with cubes: one bool ``(32, 32, 32)`` mask per cube of the region the
            generator filled (the centre hole, or the whole cube when the context is not kept).
    """

    cubes: np.ndarray | torch.Tensor
    volumes: list[CTVolume] | None = None
    masks: list[np.ndarray] | None = None


def check_task_name(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}; got {task!r}")
    return task


def per_sample_generators(generator: GeneratorArg, count: int) -> list[torch.Generator]:
    """One generator per sample, so that sample i depends only on the seed and i (not on batching).

    A list is used as given (its length must be ``count``); a single generator seeds ``count`` new CPU
    generators from its stream; None seeds them from torch's global RNG (``torch.manual_seed``).
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != count:
            raise ValueError(f"got {len(generator)} generators for {count} cubes; pass one per cube or a single one")
        return list(generator)
    if generator is None:
        seeds = torch.randint(0, 2**62, (count,))
    else:
        seeds = torch.randint(0, 2**62, (count,), generator=generator, device=generator.device)
    return [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds.tolist()]


def _seed_from(generator: torch.Generator) -> int:
    """A numpy seed drawn from a cube's own torch generator (after its fill: same seed, same draw)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))


def as_cube_batch(cubes: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``(32,)*3``, ``(B, 32, 32, 32)`` or ``(B, 1, 32, 32, 32)`` array/tensor -> float32 CPU
    ``(B, 1, 32, 32, 32)`` clamped to [-1, 1]."""
    tensor = torch.as_tensor(np.asarray(cubes) if not torch.is_tensor(cubes) else cubes).detach()
    tensor = tensor.to("cpu", torch.float32)
    if tensor.ndim == 3:
        tensor = tensor[None, None]
    elif tensor.ndim == 4:
        tensor = tensor[:, None]
    if tensor.ndim != 5 or tuple(tensor.shape[1:]) != (1,) + (CUBE_SIZE,) * 3:
        raise ValueError(f"cubes must be (B, 1, {CUBE_SIZE}, {CUBE_SIZE}, {CUBE_SIZE}); got shape {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise ValueError("cubes contain NaN or infinite values")
    return tensor.clamp(-1, 1)


PIPELINE_CODE_MODULE = "m3d_pipeline"  # the code file a saved folder carries for diffusers' custom pipelines
PIPELINE_CODE = '''"""This pipeline folder's code for ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``:
m3d's own pipeline classes (``pip install m3d``); ``model_index.json`` names the one the folder holds."""
from m3d.pipelines import CycleGAN3DPipeline, M3DInpaintPipeline, Pix2Pix3DPipeline  # noqa: F401
'''


def pipeline_class_name(entries: dict[str, Any]) -> str | None:
    """The class a ``model_index.json`` names: ``["m3d_pipeline", "Pix2Pix3DPipeline"]`` (diffusers' custom
    pipeline form, written since folders carry their code) or ``"Pix2Pix3DPipeline"`` (older folders)."""
    name = entries.get("_class_name")
    if isinstance(name, list) and len(name) == 2 and name[0] == PIPELINE_CODE_MODULE:
        name = name[1]
    return name if isinstance(name, str) else None


class M3DTamperPipeline(DiffusionPipeline):
    """Base of the m3d pipelines (not saved itself). Subclasses register their components, call
    ``self.register_to_config(task=task)`` and implement ``__call__`` through `_run`.

    A saved folder carries `PIPELINE_CODE` (``m3d_pipeline.py``) and names its class through it, so that the
    generic ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` loads it (m3d installed);
    m3d's own loaders run that file only when it is exactly m3d's one import line."""

    def to_json_string(self) -> str:
        entries = json.loads(super().to_json_string())
        entries["_class_name"] = [PIPELINE_CODE_MODULE, type(self).__name__]
        return json.dumps(entries, indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        (Path(save_directory) / f"{PIPELINE_CODE_MODULE}.py").write_text(PIPELINE_CODE)
        super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> Any:
        code = Path(pretrained_model_name_or_path) / f"{PIPELINE_CODE_MODULE}.py"
        if code.is_file() and code.read_text() == PIPELINE_CODE:
            kwargs.setdefault("trust_remote_code", True)  # m3d's own import line, nothing else
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @property
    def task(self) -> str:
        return self.config.task

    def _check_call_task(self, task: str | None) -> None:
        if task is None:
            return
        check_task_name(task)
        if task != self.config.task:
            raise ValueError(
                f"this {type(self).__name__} holds weights trained for task {self.config.task!r}; "
                f"got task={task!r}. Load the pipeline folder trained for {task!r} (one task per folder)."
            )

    def _run(
        self,
        fill: FillFn,
        steps_per_batch: int,
        *,
        cubes,
        volume: CTVolume | None,
        locations_lps_mm,
        task: str | None,
        generator: GeneratorArg,
        output_type: str,
        batch_size: int,
        progress: bool,
        lung_mask: np.ndarray | None,
        allow_outside_lung: bool,
        return_dict: bool,
        keep_context: bool = True,
        touch_up: bool = False,
    ):
        self._check_call_task(task)
        if touch_up and not keep_context:
            raise ValueError("touch_up=True blends the generated hole into the original cube: it needs keep_context=True")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}; got {output_type!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive; got {batch_size}")
        if (cubes is None) == (volume is None):
            raise ValueError("pass either `cubes` or `volume` (with `locations_lps_mm`), not both / neither")

        extracted = None
        if volume is not None:
            if locations_lps_mm is None:
                raise ValueError("`volume` needs `locations_lps_mm`: LPS (x, y, z) mm centres, one or (N, 3)")
            locations = np.asarray(locations_lps_mm, dtype=np.float64).reshape(-1, 3)
            if len(locations) == 0:
                raise ValueError("`locations_lps_mm` is empty")
            if lung_mask is None and not allow_outside_lung:
                lung_mask = segment_lungs(volume)  # once, not once per location
            # every location is checked before anything is generated (TamperLocationError)
            extracted = [
                extract_cube(volume, location, lung_mask=lung_mask, allow_outside_lung=allow_outside_lung)
                for location in locations
            ]
            unit = torch.from_numpy(np.stack([hu_to_unit(cube.hu) for cube in extracted]).astype(np.float32))[:, None]
        else:
            if output_type == "volume":
                raise ValueError('output_type="volume" needs a `volume` and `locations_lps_mm`')
            unit = as_cube_batch(cubes)

        count = unit.shape[0]
        generators = per_sample_generators(generator, count)
        hole_np = hole_mask()
        hole = torch.from_numpy(hole_np)[None, None]
        device = self._execution_device
        modules = [m for m in self.components.values() if isinstance(m, torch.nn.Module)]
        was_training = [m.training for m in modules]
        saved_bar_config = dict(getattr(self, "_progress_bar_config", {}))
        if not progress:
            self.set_progress_bar_config(**{**saved_bar_config, "disable": True})
        outputs = []
        try:
            for module in modules:
                module.eval()
            n_batches = -(-count // batch_size)
            with torch.no_grad(), self.progress_bar(total=n_batches * steps_per_batch) as bar:
                for start in range(0, count, batch_size):
                    original = unit[start : start + batch_size].to(device)
                    mask = hole.to(device, torch.float32).expand_as(original)
                    filled = fill(original, mask, generators[start : start + batch_size], bar.update)
                    outputs.append(filled.detach().to("cpu", torch.float32))
        finally:
            for module, training in zip(modules, was_training):
                module.train(training)
            self._progress_bar_config = saved_bar_config
        out = torch.cat(outputs).clamp(-1, 1)
        if keep_context:  # the known region is exactly the input
            out = torch.where(hole, out, unit)
        if touch_up:
            originals_hu = [cube.hu for cube in extracted] if extracted is not None else unit_to_hu(unit[:, 0].numpy())
            touched = [
                touch_up_cube(unit_to_hu(cube), original, self.config.task, np.random.default_rng(_seed_from(stream)))
                for cube, original, stream in zip(out[:, 0].numpy(), originals_hu, generators)
            ]
            out = torch.from_numpy(np.stack(touched))[:, None].float()
            out = torch.where(hole, hu_to_unit(out).clamp(-1, 1), unit)

        volumes = masks = None
        if extracted is not None:
            tampered = volume
            changed_any = np.zeros(volume.shape, bool)
            for cube, generated in zip(extracted, out[:, 0].numpy()):
                generated_hu = unit_to_hu(generated)
                if keep_context:  # outside the hole: the scan's own (unclipped) HU
                    generated_hu = np.where(hole_np, generated_hu, cube.hu)
                tampered, changed = paste_cube(tampered, cube, generated_hu.astype(np.float32))
                changed_any |= changed
            volumes, masks = [tampered], [changed_any]
        else:
            region = hole_np if keep_context else np.ones_like(hole_np)
            masks = [region.copy() for _ in range(count)]

        cubes_out = out if output_type == "pt" else out.numpy()
        if not return_dict:
            return cubes_out, volumes, masks
        return M3DPipelineOutput(cubes=cubes_out, volumes=volumes, masks=masks)
