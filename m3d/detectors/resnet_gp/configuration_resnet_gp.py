"""Configuration of the general-purpose real/fake detector (Corvi et al., ICASSP 2023)."""

from __future__ import annotations

from ..modeling_utils import M3DDetectorConfig


class ResNetGPConfig(M3DDetectorConfig):
    """Configuration of `ResNetGPForForgeryDetection`; defaults are Corvi et al.'s "res50stride1".

    Args:
        layers / widths: bottleneck blocks and widths per stage (ResNet-50: 3/4/6/3, 64/128/256/512).
        stem_stride: stride of the 7x7 stem conv (reference: 1).
        pool_stride: stride of the 3x3 stem max-pool (reference: 1). grip-unina/DMimageDetection
            builds "res50stride1" as ``resnet50(num_classes=1, gap_size=1, stride0=1)`` and its
            ``stride0`` sets the strides of both the stem conv and the max-pool, so the network
            down-samples by 8 (layers 2-4) instead of 32. ``stem_stride=pool_stride=2`` is the
            standard ResNet-50.
        imagenet_normalize: map inputs from [-1, 1] to [0, 1] and normalise with ImageNet statistics
            inside the model, as the reference (``norm_type="resnet"``) does.
    """

    model_type = "m3d_resnet_gp"
    presets = {"tiny": dict(layers=(1, 1, 1, 1), widths=(4, 4, 8, 8)), "default": {}}

    def __init__(
        self,
        layers: tuple[int, ...] = (3, 4, 6, 3),
        widths: tuple[int, ...] = (64, 128, 256, 512),
        stem_stride: int = 1,
        pool_stride: int = 1,
        imagenet_normalize: bool = True,
        **kwargs,
    ) -> None:
        if len(layers) != 4 or len(widths) != 4 or min(layers) < 1 or min(widths) < 1:
            raise ValueError(f"layers and widths must be four positive integers; got {layers}, {widths}")
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2; got {stem_stride}")
        if pool_stride not in (1, 2):
            raise ValueError(f"pool_stride must be 1 or 2; got {pool_stride}")
        self.layers = list(layers)
        self.widths = list(widths)
        self.stem_stride = stem_stride
        self.pool_stride = pool_stride
        self.imagenet_normalize = bool(imagenet_normalize)
        super().__init__(**kwargs)
