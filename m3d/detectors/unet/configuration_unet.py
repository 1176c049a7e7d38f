"""Configuration of the U-Net localizer (Ronneberger et al., MICCAI 2015)."""

from __future__ import annotations

from ..modeling_utils import M3DDetectorConfig

IMAGE_POOLINGS = ("max", "mean")


class UNetConfig(M3DDetectorConfig):
    """Configuration of `UNetForForgeryDetection`.

    Args:
        base_channels: width of the first level; level ``i`` has ``base_channels * 2**i`` (64 -> 1024).
        depth: number of 2x down-samplings (4, five resolutions).
        image_pooling: how the image logit is pooled from the logit map, ``"max"`` (default) or ``"mean"``.
    """

    model_type = "m3d_unet"
    presets = {"tiny": dict(base_channels=4, depth=3), "default": {}}

    def __init__(self, base_channels: int = 64, depth: int = 4, image_pooling: str = "max", **kwargs) -> None:
        if base_channels < 1 or depth < 1:
            raise ValueError(f"base_channels and depth must be >= 1; got {base_channels}, {depth}")
        if image_pooling not in IMAGE_POOLINGS:
            raise ValueError(f"image_pooling must be one of {IMAGE_POOLINGS}; got {image_pooling!r}")
        self.base_channels = base_channels
        self.depth = depth
        self.image_pooling = image_pooling
        super().__init__(**kwargs)
