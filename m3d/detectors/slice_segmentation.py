"""transformers' ``image-segmentation`` pipeline for a localizing m3d detector on one axial HU slice.

The stock pipeline reads every image as 8-bit RGB, which loses HU; this one takes the slice as an array::

    segmenter = pipeline("image-segmentation", model=folder, pipeline_class=M3DSliceSegmentationPipeline)
    segmenter(hu_slice)  # [{"label": "manipulated", "mask": <PIL L image>, "score": None}, ...]

Its image processor is the folder's `M3DCTImageProcessor` (``preprocessor_config.json``), whose
``post_process_semantic_segmentation`` cuts the detector's map at 0.5.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers.pipelines.image_segmentation import ImageSegmentationPipeline


class M3DSliceSegmentationPipeline(ImageSegmentationPipeline):
    """``image-segmentation`` of one HU slice ``(H, W)`` (array, tensor or PIL image of mode I or F) by a localizing
    m3d detector: one mask per label present ("pristine", "manipulated"), at the slice's size."""

    def check_model_type(self, supported_models: Any) -> None:
        if not getattr(self.model, "localizes", False):
            raise ValueError(f"{type(self.model).__name__} does not localize: it gives no map to segment with")

    def preprocess(self, image: Any, subtask: str | None = None, timeout: float | None = None) -> dict[str, Any]:
        hu = image if torch.is_tensor(image) else np.asarray(image)
        if hu.ndim != 2:
            raise ValueError(f"expected one HU slice (H, W); got shape {tuple(hu.shape)}")
        inputs = self.image_processor(hu, return_tensors="pt").to(self.dtype)
        inputs["target_size"] = [tuple(hu.shape)]
        return inputs
