"""The HU -> model input transform of the m3d detectors, as a transformers image processor.

`M3DCTImageProcessor` holds a detector's slice transform (``input_mode``, ``hu_windows``, ``percentiles``,
``slab_slices``, as in `M3DDetectorConfig`) and turns HU slices into the ``pixel_values`` the detector takes. Saved
beside a detector as ``preprocessor_config.json``, it loads with ``AutoImageProcessor.from_pretrained(folder)`` once
`register_image_processors` has run.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers.image_processing_base import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ImagesKwargs
from transformers.utils import TensorType

from ..data.ct import CTVolume
from .modeling_utils import DEFAULT_HU_WINDOWS, M3DDetectorConfig, check_slice_transform

# keys transformers itself writes into preprocessor_config.json
_SAVED_BY_TRANSFORMERS = ("image_processor_type", "auto_map")


class M3DCTImagesKwargs(ImagesKwargs, total=False):
    """The processor's own settings, which ``from_pretrained(folder, **kwargs)`` may override."""

    input_mode: str
    hu_windows: list[list[float]]
    percentiles: list[float]
    slab_slices: int


class M3DCTImageProcessor(BaseImageProcessor):
    """HU slices -> ``pixel_values`` ``(n, C, H, W)`` float32 in [-1, 1], each value clipped to its window.

    Args:
        input_mode: ``"hu_windows"`` (channel c = the slice in HU window c), ``"percentile"`` (the slice scaled
            between two percentiles of its scan, on 3 channels), ``"adjacent_slices"`` (slices k-1, k, k+1 in the
            first HU window) or ``"slab"`` (the ``slab_slices`` slices centred on k, in the first HU window).
        hu_windows: three ``(low, high)`` HU windows.
        percentiles: ``(low, high)`` percentiles for ``"percentile"``.
        slab_slices: the slices of one ``"slab"`` input (odd).
    """

    model_input_names = ["pixel_values"]
    valid_kwargs = M3DCTImagesKwargs

    def __init__(
        self,
        input_mode: str = "hu_windows",
        hu_windows: Sequence[Sequence[float]] = DEFAULT_HU_WINDOWS,
        percentiles: Sequence[float] = (0.5, 99.5),
        slab_slices: int = 1,
        **kwargs: Any,
    ) -> None:
        unknown = sorted(set(kwargs) - set(_SAVED_BY_TRANSFORMERS))
        if unknown:
            raise ValueError(f"M3DCTImageProcessor has no setting {', '.join(unknown)}")
        check_slice_transform(input_mode, hu_windows, percentiles, slab_slices)
        super().__init__(**kwargs)
        self.input_mode = input_mode
        self.hu_windows = [list(map(float, window)) for window in hu_windows]
        self.percentiles = list(map(float, percentiles))
        self.slab_slices = int(slab_slices)

    @classmethod
    def from_detector_config(cls, config: M3DDetectorConfig) -> M3DCTImageProcessor:
        """The processor of a detector's config (the transform it was trained with)."""
        return cls(config.input_mode, config.hu_windows, config.percentiles, config.slab_slices)

    @property
    def input_slices(self) -> int:
        """How many axial slices one input is made of (centred on the slice it stands for): 3 for
        ``"adjacent_slices"``, ``slab_slices`` for ``"slab"``, 1 otherwise."""
        if self.input_mode == "slab":
            return self.slab_slices
        return 3 if self.input_mode == "adjacent_slices" else 1

    def volume_statistics(self, hu_zyx: np.ndarray | torch.Tensor) -> tuple[float, float] | None:
        """The per-scan scaling bounds of ``"percentile"`` (None for the other modes)."""
        if self.input_mode != "percentile":
            return None
        low, high = np.percentile(hu_zyx, self.percentiles)
        return float(low), float(max(high, low + 1.0))

    def preprocess(
        self,
        images: np.ndarray | torch.Tensor | CTVolume,
        slice_indices: Sequence[int] | np.ndarray | None = None,
        statistics: tuple[float, float] | None = None,
        return_tensors: str | TensorType | None = None,
    ) -> BatchFeature:
        """``pixel_values`` ``(n, C, H, W)`` (a torch tensor unless ``return_tensors`` asks otherwise) for a HU slice
        ``(H, W)`` (n = 1) or for the slices ``slice_indices`` (all by default) of a HU volume ``(Z, H, W)`` or
        `CTVolume`, with their neighbours for ``"adjacent_slices"`` and ``"slab"`` (past either end the end slice
        repeats). ``statistics``: the scan's ``"percentile"`` bounds (`volume_statistics`; of ``images`` if omitted).
        """
        hu = images.hu if isinstance(images, CTVolume) else images
        hu = hu if torch.is_tensor(hu) else np.asarray(hu)
        if hu.ndim not in (2, 3) or hu.shape[0] == 0:
            raise ValueError(
                f"expected a HU slice (H, W) or volume (Z, H, W) with at least one slice; got shape {tuple(hu.shape)}"
            )
        if statistics is None and self.input_mode == "percentile":
            statistics = self.volume_statistics(hu)
        volume = hu if hu.ndim == 3 else hu[None]
        depth = volume.shape[0]
        indices = np.arange(depth) if slice_indices is None else np.asarray(slice_indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= depth):
            raise ValueError(f"slice indices must lie in [0, {depth}); got {indices.min()} to {indices.max()}")
        half = self.input_slices // 2
        planes = torch.as_tensor(volume[(indices[:, None] + np.arange(-half, half + 1)).clip(0, depth - 1)]).float()
        if self.input_mode == "hu_windows":
            bounds = torch.tensor(self.hu_windows, dtype=torch.float32).view(1, 3, 2, 1, 1)
            scaled = (planes - bounds[:, :, 0]) / (bounds[:, :, 1] - bounds[:, :, 0])
        elif self.input_mode == "percentile":
            low, high = statistics
            scaled = ((planes - low) / (high - low)).expand(-1, 3, -1, -1)
        else:
            low, high = self.hu_windows[0]
            scaled = (planes - low) / (high - low)
        pixel_values = (scaled.clamp(0, 1) * 2 - 1).contiguous()
        return BatchFeature({"pixel_values": pixel_values}, tensor_type=return_tensors)

    def post_process_semantic_segmentation(
        self,
        outputs: Any,
        target_sizes: Sequence[tuple[int, int]] | None = None,
        threshold: float = 0.5,
    ) -> list[torch.Tensor]:
        """One ``(H, W)`` long map per input from a localizing detector's outputs: 1 (manipulated) where the
        probability is at least ``threshold``, else 0; resized (bilinear, as `detect_volume`) to ``target_sizes``."""
        logits = outputs.get("localization_logits")
        if logits is None:
            raise ValueError("the outputs hold no localization_logits: this detector does not localize")
        maps = []
        for index, probability in enumerate(torch.sigmoid(logits.float())):
            if target_sizes is not None and tuple(probability.shape[-2:]) != tuple(target_sizes[index]):
                probability = F.interpolate(
                    probability[None], size=tuple(target_sizes[index]), mode="bilinear", align_corners=False
                )[0]
            maps.append((probability[0] >= threshold).long())
        return maps


def register_image_processors() -> None:
    """Register `M3DCTImageProcessor` with ``AutoImageProcessor`` for every m3d detector config (each subclass of
    `M3DDetectorConfig` imported so far: call it once the detectors are imported)."""
    from transformers import AutoImageProcessor

    backends = {"pil": M3DCTImageProcessor, "torchvision": M3DCTImageProcessor}  # it needs neither PIL nor torchvision
    config_classes = M3DDetectorConfig.__subclasses__()
    while config_classes:
        config_class = config_classes.pop()
        config_classes += config_class.__subclasses__()
        AutoImageProcessor.register(config_class, image_processor_classes=dict(backends), exist_ok=True)
