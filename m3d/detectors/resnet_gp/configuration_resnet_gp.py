"""Configuration of the general-purpose real/fake detector (Corvi et al., ICASSP 2023)."""
from __future__ import annotations

from ..modeling_utils import M3DDetectorConfig


class ResNetGPConfig(M3DDetectorConfig):
    """Configuration of `ResNetGPForForgeryDetection`; defaults are Corvi et al.'s "res50stride1".

    Args:
        layers / widths: bottleneck blocks and widths per stage (ResNet-50: 3/4/6/3, 64/128/256/512).
        stem_stride: stride of the 7x7 stem conv; 1 removes the first down-sampling (Corvi et al.).
        imagenet_normalize: map inputs from [-1, 1] to [0, 1] and normalise with ImageNet statistics
            inside the model, as the reference implementation expects.
    """

    model_type = "m3d_resnet_gp"

    def __init__(
        self,
        layers: tuple[int, ...] = (3, 4, 6, 3),
        widths: tuple[int, ...] = (64, 128, 256, 512),
        stem_stride: int = 1,
        imagenet_normalize: bool = True,
        **kwargs,
    ) -> None:
        if len(layers) != 4 or len(widths) != 4 or min(layers) < 1 or min(widths) < 1:
            raise ValueError(f"layers and widths must be four positive integers; got {layers}, {widths}")
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2; got {stem_stride}")
        self.layers = list(layers)
        self.widths = list(widths)
        self.stem_stride = stem_stride
        self.imagenet_normalize = imagenet_normalize
        super().__init__(**kwargs)
