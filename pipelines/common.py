"""What the three m3d tampering pipelines share, written once: the output class, the cube processor
(`CubeProcessor`: cut the 32 mm cube at each site at 1 mm, scale the HU window to [-1, 1], mask the hole;
afterwards keep the known region, apply CT-GAN's touch-ups, paste back into the scan), one random generator
per cube, the input checks, and saving and loading (the folder's code file, component names of folders
saved before a rename).

Each pipeline's ``__call__`` reads as diffusers' do: ``check_inputs`` -> ``cube_processor.preprocess`` ->
its own generation loop over `CubeBatch`es -> ``cube_processor.postprocess``.
"""

from __future__ import annotations

import fcntl
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence, get_type_hints

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from ..constants import CUBE_SPACING_MM, TASKS
from ..data.ct import CTVolume
from ..data.lungs import segment_lungs
from ..loading import read_json_object
from ..tamper.cube import CUBE_SIZE, Cube, extract_cube, hole_mask, hu_to_unit, paste_cube, unit_to_hu
from ..tamper.nodule_shape import bank_nodule_mask, random_nodule_mask, sample_target_diameter_mm
from ..tamper.touch_up import replacement_weight
from ..tamper.touch_up import touch_up as touch_up_cube
from .nodule_mask_bank import NoduleMaskBank

OUTPUT_TYPES = ("np", "pt", "volume")
# a component's name in folders saved before it was renamed -> its name now (``generator`` was the GANs' network:
# diffusers reserves ``generator`` for random generators)
RENAMED_COMPONENTS = {"generator": "network"}
MODEL_LOADING_KWARGS = ("dtype", "torch_dtype", "use_safetensors", "variant", "low_cpu_mem_usage")

NODULE_MASK_CHANNELS = 3  # a GAN network with 3 input channels also sees the mask of the nodule to draw

GeneratorArg = torch.Generator | Sequence[torch.Generator] | None


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
        replaced: one float32 ``(32, 32, 32)`` array per cube, 0-1: how much of the input each voxel of the cube
            replaces, as `m3d.tamper.cube.paste_cube` takes it (1 over the hole, or the whole cube when the context
            is not kept; with CT-GAN's touch-ups their blend, `m3d.tamper.touch_up.replacement_weight`).
    """

    cubes: np.ndarray | torch.Tensor
    volumes: list[CTVolume] | None = None
    masks: list[np.ndarray] | None = None
    replaced: list[np.ndarray] | None = None


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


def numpy_rng(generator: torch.Generator) -> np.random.Generator:
    """A numpy generator seeded from a cube's own torch generator (after its generation: same seed, same draw)."""
    return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)))


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
        raise ValueError(
            f"cubes must be (B, 1, {CUBE_SIZE}, {CUBE_SIZE}, {CUBE_SIZE}); got shape {tuple(tensor.shape)}"
        )
    if not torch.isfinite(tensor).all():
        raise ValueError("cubes contain NaN or infinite values")
    return tensor.clamp(-1, 1)


def network_input(
    masked: torch.Tensor, hole_mask: torch.Tensor, channels: int, nodule_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """What a GAN network with ``channels`` input channels sees: the ``masked`` cubes (1), with the ``hole_mask``
    (2), and with the mask of the nodule to draw (`NODULE_MASK_CHANNELS`); all ``(b, 1, 32, 32, 32)``."""
    if channels == 1:
        return masked
    if channels == 2:
        return torch.cat([masked, hole_mask], dim=1)
    if channels == NODULE_MASK_CHANNELS and nodule_mask is not None:
        return torch.cat([masked, hole_mask, nodule_mask.to(masked.dtype)], dim=1)
    raise ValueError(f"a network with {channels} input channels needs {'a nodule mask' if channels == 3 else '1-3'}")


@dataclass
class CubeBatch:
    """One batch of cubes on the network's device: ``cubes`` the originals ``(b, 1, 32, 32, 32)`` in [-1, 1],
    ``hole_mask`` 1 in the centre hole (same shape), the cubes' own random generators, and for mask-conditioned
    networks the mask of the nodule to draw in each (same shape)."""

    cubes: torch.Tensor
    hole_mask: torch.Tensor
    generators: list[torch.Generator]
    nodule_mask: torch.Tensor | None = None

    @property
    def known_mask(self) -> torch.Tensor:
        """1 outside the hole: the region the output keeps from the input."""
        return 1.0 - self.hole_mask

    def condition(self, channels: int) -> torch.Tensor:
        """What a network is conditioned on (`network_input`): the cubes with the hole set to 0, with
        ``channels=2`` the hole mask, with ``channels=3`` also the target nodule mask."""
        return network_input(self.cubes * self.known_mask, self.hole_mask, channels, self.nodule_mask)


@dataclass
class CubeInputs:
    """`CubeProcessor.preprocess`'s result: ``cubes`` ``(N, 1, 32, 32, 32)`` float32 in [-1, 1] on the CPU,
    ``hole_mask`` 1 in their centre hole, and with a scan as input the scan and the `Cube` cut at each location."""

    cubes: torch.Tensor
    hole_mask: torch.Tensor
    volume: CTVolume | None = None
    sites: list[Cube] | None = None
    nodule_mask: torch.Tensor | None = None  # the target nodule of a mask-conditioned network, 1 inside

    def __len__(self) -> int:
        return self.cubes.shape[0]

    def batches(self, batch_size: int, generators: list[torch.Generator], device: torch.device) -> list[CubeBatch]:
        """The cubes in batches of ``batch_size`` on ``device``, each with its cubes' ``generators``."""
        return [
            CubeBatch(
                self.cubes[start : start + batch_size].to(device),
                self.hole_mask[start : start + batch_size].to(device),
                generators[start : start + batch_size],
                None if self.nodule_mask is None else self.nodule_mask[start : start + batch_size].to(device),
            )
            for start in range(0, len(self), batch_size)
        ]


class CubeProcessor:
    """The pipelines' pre- and post-processing (`m3d.tamper.cube`): ``preprocess`` turns cubes or a scan and
    locations into masked cubes in [-1, 1]; ``postprocess`` turns generated cubes into the pipeline's output."""

    def __init__(self) -> None:
        self.hole = torch.from_numpy(hole_mask())[None, None]  # (1, 1, 32, 32, 32) bool

    def preprocess(
        self,
        cubes: np.ndarray | torch.Tensor | None = None,
        volume: CTVolume | None = None,
        locations_lps_mm: Any = None,
        *,
        lung_mask: np.ndarray | None = None,
        allow_outside_lung: bool = False,
    ) -> CubeInputs:
        """``cubes`` as they are (clamped to [-1, 1]), or a 32 mm cube cut at 1 mm around each of ``volume``'s
        locations with `extract_cube` (every location checked before any is used; the lungs segmented once when
        no ``lung_mask`` is given) and its HU window scaled to [-1, 1]; with the hole mask."""
        sites = None
        if volume is not None:
            locations = np.asarray(locations_lps_mm, dtype=np.float64).reshape(-1, 3)
            if lung_mask is None and not allow_outside_lung:
                lung_mask = segment_lungs(volume)
            sites = [
                extract_cube(volume, location, lung_mask=lung_mask, allow_outside_lung=allow_outside_lung)
                for location in locations
            ]
            unit = torch.from_numpy(np.stack([hu_to_unit(site.hu) for site in sites]).astype(np.float32))[:, None]
        else:
            unit = as_cube_batch(cubes)
        return CubeInputs(unit, self.hole.to(torch.float32).expand_as(unit), volume, sites)

    def nodule_masks(
        self,
        inputs: CubeInputs,
        task: str,
        generators: list[torch.Generator],
        nodule_masks: np.ndarray | torch.Tensor | None = None,
        diameter_mm: float | tuple[float, float] | None = None,
        bank: NoduleMaskBank | None = None,
    ) -> CubeInputs:
        """``inputs`` with the mask of the nodule a mask-conditioned network draws in each cube: ``nodule_masks``
        as given (``(N, [1,] 32, 32, 32)``, nonzero inside; only their part in the hole counts), or one drawn per
        cube from its generator: from the pipeline's ``bank`` of training nodule masks (`bank_nodule_mask`; of about
        ``diameter_mm`` when given: one value or a ``(low, high)`` range; else in the bank's own ``diameter_mm``),
        or without a bank a `random_nodule_mask` of a diameter drawn from ``diameter_mm`` (None: the task's
        `TARGET_NODULE_DIAMETER_MM`)."""
        if nodule_masks is not None:
            masks = torch.as_tensor(
                np.array(nodule_masks.detach().cpu() if torch.is_tensor(nodule_masks) else nodule_masks)
            )
            masks = masks[:, None] if masks.ndim == 4 else masks
            if tuple(masks.shape) != (len(inputs), 1, CUBE_SIZE, CUBE_SIZE, CUBE_SIZE):
                edge = f"{CUBE_SIZE}, {CUBE_SIZE}, {CUBE_SIZE}"
                raise ValueError(
                    f"nodule_masks must be ({len(inputs)}, 1, {edge}) or ({len(inputs)}, {edge}), one per cube; "
                    f"got shape {tuple(masks.shape)}"
                )
            masks = (masks != 0) & self.hole
        else:
            drawn, bank_masks = [], None if bank is None else bank.masks
            bank_size = bank.config.diameter_mm if bank is not None and diameter_mm is None else diameter_mm
            for stream in generators:
                rng = numpy_rng(stream)
                if bank_masks is not None:
                    drawn.append(bank_nodule_mask(rng, bank_masks, bank_size, CUBE_SIZE))
                    continue
                diameter = sample_target_diameter_mm(rng, task, diameter_mm)
                drawn.append(random_nodule_mask(rng, diameter, CUBE_SIZE, CUBE_SPACING_MM))
            masks = torch.from_numpy(np.stack(drawn))[:, None]
        inputs.nodule_mask = masks.to(torch.float32)
        return inputs

    def postprocess(
        self,
        inputs: CubeInputs,
        generated: torch.Tensor,
        *,
        task: str,
        generators: list[torch.Generator],
        keep_context: bool = True,
        touch_up: bool = False,
        output_type: str = "np",
    ) -> M3DPipelineOutput:
        """The ``generated`` cubes clamped to [-1, 1]; with ``keep_context`` the input outside the hole; with
        ``touch_up`` CT-GAN's touch-ups for ``task`` (`m3d.tamper.touch_up`, seeded by each cube's generator);
        with a scan as input, pasted back into it (`paste_back`)."""
        out = generated.to("cpu", torch.float32).clamp(-1, 1)
        region = self.hole[0, 0].numpy() if keep_context else np.ones(self.hole.shape[2:], bool)
        if keep_context:
            out = torch.where(self.hole, out, inputs.cubes)
        if touch_up:
            replaced = [replacement_weight(unit_to_hu(cube), task).astype(np.float32) for cube in out[:, 0].numpy()]
            out = self.touch_up(inputs, out, task, generators)
        else:
            replaced = [region.astype(np.float32) for _ in range(len(inputs))]
        if inputs.volume is not None:
            volumes, masks = self.paste_back(inputs, out, replaced, keep_context)
        else:
            volumes, masks = None, [region.copy() for _ in range(len(inputs))]
        return M3DPipelineOutput(
            cubes=out if output_type == "pt" else out.numpy(), volumes=volumes, masks=masks, replaced=replaced
        )

    def touch_up(
        self, inputs: CubeInputs, cubes: torch.Tensor, task: str, generators: list[torch.Generator]
    ) -> torch.Tensor:
        """CT-GAN's touch-ups for ``task`` on each cube's hole (`m3d.tamper.touch_up`): the noise of the input's own
        scanner, seeded by the cube's generator, and a blend into the input instead of a hard paste."""
        originals_hu = (
            [site.hu for site in inputs.sites] if inputs.sites is not None else unit_to_hu(inputs.cubes[:, 0].numpy())
        )
        touched_hu = np.stack(
            [
                touch_up_cube(unit_to_hu(cube), original, task, numpy_rng(stream))
                for cube, original, stream in zip(cubes[:, 0].numpy(), originals_hu, generators)
            ]
        )
        touched = hu_to_unit(torch.from_numpy(touched_hu)[:, None].float()).clamp(-1, 1)
        return torch.where(self.hole, touched, inputs.cubes)

    def paste_back(
        self, inputs: CubeInputs, cubes: torch.Tensor, replaced: list[np.ndarray], keep_context: bool
    ) -> tuple[list[CTVolume], list[np.ndarray]]:
        """``[tampered scan]`` with every cube pasted at its site in turn, replacing the scan by each cube's
        ``replaced`` weights (outside the hole, with ``keep_context``, the scan's own unclipped HU; no grain drawn:
        every grain `paste_cube` has drawn made the fakes easier to localize, README), and ``[mask of the voxels
        that changed]``."""
        hole = self.hole[0, 0].numpy()
        tampered, changed_any = inputs.volume, np.zeros(inputs.volume.shape, bool)
        for site, generated, share in zip(inputs.sites, cubes[:, 0].numpy(), replaced):
            generated_hu = unit_to_hu(generated)
            if keep_context:
                generated_hu = np.where(hole, generated_hu, site.hu)
            tampered, changed = paste_cube(
                tampered, site, generated_hu.astype(np.float32), replaced=share, grain_rng=None
            )
            changed_any |= changed
        return [tampered], [changed_any]


@contextmanager
def remote_code_lock() -> Iterator[None]:
    """Hold the machine-wide lock on diffusers' copy of local pipeline code for the block. diffusers copies
    every local folder's ``m3d_pipeline.py`` to one path under ``HF_MODULES_CACHE`` and imports it from
    there, under a lock of its process only: a load in another process (a second rank of a build) that
    rewrites the file while this one imports it leaves this one a half-written module."""
    from diffusers.utils.constants import HF_MODULES_CACHE

    path = Path(HF_MODULES_CACHE) / ".m3d-pipeline-code.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


PIPELINE_CODE_MODULE = "m3d_pipeline"  # the code file a saved folder carries for diffusers' custom pipelines
PIPELINE_CODE = '''"""This pipeline folder's code for ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``:
m3d's own pipeline classes (``pip install m3d``); ``model_index.json`` names the one the folder holds."""
from m3d.pipelines import CycleGAN3DPipeline, M3DInpaintPipeline, Pix2Pix3DPipeline  # noqa: F401
'''  # noqa: E501 (the text saved folders carry, byte for byte)


def pipeline_class_name(entries: dict[str, Any]) -> str | None:
    """The class a ``model_index.json`` names: ``["m3d_pipeline", "Pix2Pix3DPipeline"]`` (diffusers' custom
    pipeline form, written since folders carry their code) or ``"Pix2Pix3DPipeline"`` (older folders)."""
    name = entries.get("_class_name")
    if isinstance(name, list) and len(name) == 2 and name[0] == PIPELINE_CODE_MODULE:
        name = name[1]
    return name if isinstance(name, str) else None


class M3DTamperPipeline(DiffusionPipeline):
    """Base of the m3d pipelines (not saved itself). Subclasses register their components, call
    ``self.register_to_config(task=task)`` and write ``__call__`` with `check_inputs`, ``self.cube_processor``
    (a `CubeProcessor`) and `_generating`.

    A saved folder carries `PIPELINE_CODE` (``m3d_pipeline.py``) and names its class through it, so that the
    generic ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` loads it (m3d installed);
    m3d's own loaders run that file only when it is exactly m3d's one import line. They also load local folders
    saved before a component was renamed (`RENAMED_COMPONENTS`).

    A mask-conditioned pipeline also holds the ``nodule_mask_bank`` component (`NoduleMaskBank`): the masks of
    the nodules its network was trained on, drawn from when a call gives no ``nodule_masks``."""

    _optional_components = ["nodule_mask_bank"]

    def __init__(self) -> None:
        super().__init__()
        self.cube_processor = CubeProcessor()

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
        folder = Path(pretrained_model_name_or_path)
        code = folder / f"{PIPELINE_CODE_MODULE}.py"
        if code.is_file() and code.read_text() == PIPELINE_CODE:
            kwargs.setdefault("trust_remote_code", True)  # m3d's own import line, nothing else
        kwargs = {**cls._load_renamed_components(folder, kwargs), **kwargs}
        with remote_code_lock():
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def _load_renamed_components(cls, folder: Path, kwargs: dict[str, Any]) -> dict[str, torch.nn.Module]:
        """The components a local folder saved before a rename holds under their old names, loaded from their
        old subfolders and keyed by their names now (diffusers would look for the new subfolders)."""
        index = folder / "model_index.json"
        if not index.is_file():
            return {}
        entries, component_classes = read_json_object(index), get_type_hints(cls.__init__)
        loading = {key: kwargs[key] for key in MODEL_LOADING_KWARGS if key in kwargs}
        return {
            new: component_classes[new].from_pretrained(folder / old, **loading)
            for old, new in RENAMED_COMPONENTS.items()
            if old in entries and new in component_classes and new not in entries and new not in kwargs
        }

    @classmethod
    def extract_init_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> tuple[dict, dict, dict]:
        """diffusers' own, without the old names of renamed components (`from_pretrained` loads those)."""
        current = {key: value for key, value in config_dict.items() if key not in RENAMED_COMPONENTS}
        return super().extract_init_dict(current, **kwargs)

    @property
    def task(self) -> str:
        return self.config.task

    @property
    def mask_conditioned(self) -> bool:
        """Whether the network also sees the mask of the nodule to draw (a GAN network with `NODULE_MASK_CHANNELS`
        input channels, a UNet with one more: the noisy cube)."""
        network = getattr(self, "network", None)
        if network is not None:
            return network.config.in_channels == NODULE_MASK_CHANNELS
        unet = getattr(self, "unet", None)
        return unet is not None and unet.config.in_channels == 1 + NODULE_MASK_CHANNELS

    def check_inputs(
        self,
        cubes: np.ndarray | torch.Tensor | None,
        volume: CTVolume | None,
        locations_lps_mm: Any,
        task: str | None,
        output_type: str,
        batch_size: int,
        keep_context: bool = True,
        touch_up: bool = False,
        nodule_masks: Any = None,
        mask_conditioned: bool = False,
    ) -> None:
        """One clear `ValueError` for a call that cannot work, before anything is computed (``mask_conditioned``:
        whether the network sees a target nodule mask, which ``nodule_masks`` gives)."""
        if nodule_masks is not None and not mask_conditioned:
            raise ValueError(
                f"this {type(self).__name__}'s network is not conditioned on a nodule mask (it takes "
                f"{NODULE_MASK_CHANNELS - 1} input channels or fewer): do not pass `nodule_masks`"
            )
        if task is not None and check_task_name(task) != self.config.task:
            raise ValueError(
                f"this {type(self).__name__} holds weights trained for task {self.config.task!r}; "
                f"got task={task!r}. Load the pipeline folder trained for {task!r} (one task per folder)."
            )
        if touch_up and not keep_context:
            raise ValueError(
                "touch_up=True blends the generated hole into the original cube: it needs keep_context=True"
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}; got {output_type!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive; got {batch_size}")
        if (cubes is None) == (volume is None):
            raise ValueError("pass either `cubes` or `volume` (with `locations_lps_mm`), not both / neither")
        if volume is None and output_type == "volume":
            raise ValueError('output_type="volume" needs a `volume` and `locations_lps_mm`')
        if volume is not None and locations_lps_mm is None:
            raise ValueError("`volume` needs `locations_lps_mm`: LPS (x, y, z) mm centres, one or (N, 3)")
        if volume is not None and np.size(locations_lps_mm) == 0:
            raise ValueError("`locations_lps_mm` is empty")

    @contextmanager
    def _generating(self, progress: bool) -> Iterator[None]:
        """For the generation loop: every model in eval mode, the progress bars hidden unless ``progress``;
        both as they were afterwards (a pipeline may share its networks with a training run)."""
        modules = [module for module in self.components.values() if isinstance(module, torch.nn.Module)]
        was_training = [module.training for module in modules]
        bar_config = dict(getattr(self, "_progress_bar_config", {}))
        if not progress:
            self.set_progress_bar_config(**{**bar_config, "disable": True})
        try:
            for module in modules:
                module.eval()
            yield
        finally:
            for module, training in zip(modules, was_training):
                module.train(training)
            self._progress_bar_config = bar_config
