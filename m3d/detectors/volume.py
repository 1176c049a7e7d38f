"""Running a 2-D detector over a whole CT volume: HU -> 3-channel slices -> 3-D map + volume score.

How HU become the model's input is `M3DCTImageProcessor`, built from the model's config
(`M3DDetectorConfig.input_mode`, ...), so a saved detector always sees its slices the way it was trained.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.ct import CTVolume
from .image_processing_m3d import M3DCTImageProcessor
from .modeling_utils import M3DDetectorConfig


def volume_statistics(hu_zyx: np.ndarray, config: M3DDetectorConfig) -> tuple[float, float] | None:
    """Per-scan scaling bounds for ``input_mode="percentile"`` (None for the other modes)."""
    return M3DCTImageProcessor.from_detector_config(config).volume_statistics(hu_zyx)


def input_slices(config: M3DDetectorConfig) -> int:
    """How many axial slices one model input is made of (`M3DCTImageProcessor.input_slices`)."""
    return M3DCTImageProcessor.from_detector_config(config).input_slices


def slices_to_input(
    hu_zyx: np.ndarray | torch.Tensor,
    slice_indices: np.ndarray | list[int],
    config: M3DDetectorConfig,
    statistics: tuple[float, float] | None = None,
) -> torch.Tensor:
    """The model input ``(n, C, H, W)`` for the given axial slices of a HU volume: `M3DCTImageProcessor`
    of ``config`` (``statistics``: `volume_statistics`, computed here if omitted)."""
    return M3DCTImageProcessor.from_detector_config(config)(hu_zyx, slice_indices, statistics)["pixel_values"]


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
    image_processor: M3DCTImageProcessor | None = None,
) -> VolumeDetection:
    """Run ``model`` slice by slice over ``volume`` in batches (memory bounded for any slice count); HU become
    its input by ``image_processor`` (by default the one of ``model.config``, the transform it was trained with)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    hu = volume.hu if isinstance(volume, CTVolume) else np.asarray(volume)
    if hu.ndim != 3 or hu.shape[0] == 0:
        raise ValueError(f"expected a (z, y, x) volume with at least one slice; got shape {hu.shape}")
    processor = image_processor or M3DCTImageProcessor.from_detector_config(model.config)
    parameter = next(model.parameters())
    statistics = processor.volume_statistics(hu)
    was_training = model.training
    model.eval()
    slice_scores = np.empty(hu.shape[0], np.float32)
    localization: np.ndarray | None = None
    starts = range(0, hu.shape[0], batch_size)
    for start in tqdm(starts, desc="slices", unit="batch", disable=not progress):
        indices = np.arange(start, min(start + batch_size, hu.shape[0]))
        pixel_values = processor(hu, indices, statistics)["pixel_values"].to(parameter.device, parameter.dtype)
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
