"""Running a 2-D detector over a whole CT volume: HU -> 3-channel slices -> 3-D map + volume score.

How HU become the model's input is set by the model's config (`M3DDetectorConfig.input_mode`), so a
saved detector always sees its slices the way it was trained.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.ct import CTVolume
from .modeling_utils import M3DDetectorConfig


def volume_statistics(hu_zyx: np.ndarray, config: M3DDetectorConfig) -> tuple[float, float] | None:
    """Per-scan scaling bounds for ``input_mode="percentile"`` (None for the other modes)."""
    if config.input_mode != "percentile":
        return None
    low, high = np.percentile(hu_zyx, config.percentiles)
    return float(low), float(max(high, low + 1.0))


def input_slices(config: M3DDetectorConfig) -> int:
    """How many axial slices one model input is made of: 3 for ``"adjacent_slices"``, ``slab_slices``
    for ``"slab"``, 1 otherwise (centred on the slice the input stands for)."""
    if config.input_mode == "slab":
        return config.slab_slices
    return 3 if config.input_mode == "adjacent_slices" else 1


def slices_to_input(
    hu_zyx: np.ndarray | torch.Tensor,
    slice_indices: np.ndarray | list[int],
    config: M3DDetectorConfig,
    statistics: tuple[float, float] | None = None,
) -> torch.Tensor:
    """The model input ``(n, C, H, W)`` float32 in [-1, 1] for the given axial slices of a HU volume
    (``C`` = 3, or ``slab_slices`` for ``input_mode="slab"``; neighbours past either end repeat it).

    ``statistics`` are the per-scan bounds of ``volume_statistics`` (computed here if omitted).
    """
    hu = torch.as_tensor(np.asarray(hu_zyx) if not torch.is_tensor(hu_zyx) else hu_zyx).float()
    indices = torch.as_tensor(np.asarray(slice_indices), dtype=torch.long)
    if config.input_mode == "hu_windows":
        planes = hu[indices].unsqueeze(1)
        bounds = torch.tensor(config.hu_windows, dtype=torch.float32).view(1, 3, 2, 1, 1)
        scaled = (planes - bounds[:, :, 0]) / (bounds[:, :, 1] - bounds[:, :, 0])
    elif config.input_mode in ("adjacent_slices", "slab"):
        half = input_slices(config) // 2
        offsets = torch.arange(-half, half + 1)
        neighbours = (indices[:, None] + offsets).clamp(0, hu.shape[0] - 1)
        low, high = config.hu_windows[0]
        scaled = (hu[neighbours] - low) / (high - low)
    else:
        low, high = statistics if statistics is not None else volume_statistics(np.asarray(hu), config)
        scaled = ((hu[indices] - low) / (high - low)).unsqueeze(1).expand(-1, 3, -1, -1)
    return (scaled.clamp(0, 1) * 2 - 1).contiguous()


@dataclass
class VolumeDetection:
    """A detector's answer for one volume.

    ``score``: probability that the volume is manipulated = max over slices (as the M3Dsynth paper);
    ``slice_scores``: ``(z,)`` per-slice probabilities; ``localization``: ``(z, y, x)`` float32
    probability map (None for detectors that do not localize).
    """

    score: float
    slice_scores: np.ndarray
    localization: np.ndarray | None


@torch.no_grad()
def detect_volume(
    model: torch.nn.Module,
    volume: CTVolume | np.ndarray,
    *,
    batch_size: int = 16,
    progress: bool = False,
) -> VolumeDetection:
    """Run ``model`` slice by slice over ``volume`` in batches (memory bounded for any slice count)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    hu = volume.hu if isinstance(volume, CTVolume) else np.asarray(volume)
    if hu.ndim != 3 or hu.shape[0] == 0:
        raise ValueError(f"expected a (z, y, x) volume with at least one slice; got shape {hu.shape}")
    config = model.config
    parameter = next(model.parameters())
    statistics = volume_statistics(hu, config)
    was_training = model.training
    model.eval()
    slice_scores = np.empty(hu.shape[0], np.float32)
    localization: np.ndarray | None = None
    starts = range(0, hu.shape[0], batch_size)
    for start in tqdm(starts, desc="slices", unit="batch", disable=not progress):
        indices = np.arange(start, min(start + batch_size, hu.shape[0]))
        pixel_values = slices_to_input(hu, indices, config, statistics).to(parameter.device, parameter.dtype)
        output = model(pixel_values=pixel_values)
        slice_scores[indices] = torch.sigmoid(output.logits.float()).view(-1).cpu().numpy()
        if output.localization_logits is not None:
            if localization is None:
                localization = np.zeros(hu.shape, np.float32)
            maps = torch.sigmoid(output.localization_logits.float())
            if maps.shape[-2:] != hu.shape[1:]:
                maps = torch.nn.functional.interpolate(maps, size=hu.shape[1:], mode="bilinear", align_corners=False)
            localization[indices] = maps[:, 0].cpu().numpy()
    model.train(was_training)
    return VolumeDetection(float(slice_scores.max()), slice_scores, localization)
