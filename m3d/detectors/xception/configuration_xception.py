"""Configuration of the Xception real/fake slice classifier (Chollet, CVPR 2017)."""

from __future__ import annotations

from ..modeling_utils import M3DDetectorConfig


class XceptionConfig(M3DDetectorConfig):
    """Configuration of `XceptionForForgeryDetection`; defaults are Chollet's Xception.

    Args:
        stem_channels: widths of the two stem 3x3 convs (32, 64).
        entry_channels: widths of the three strided entry-flow blocks (128, 256, 728).
        middle_blocks: number of middle-flow blocks of three separable convs (8).
        exit_channels: widths of the exit block and the two final separable convs (1024, 1536, 2048).
        dropout: dropout before the classifier (0).
    """

    model_type = "m3d_xception"
    presets = {
        "tiny": dict(stem_channels=(4, 8), entry_channels=(8, 8, 16), middle_blocks=1, exit_channels=(16, 16, 16)),
        "default": {},
    }

    def __init__(
        self,
        stem_channels: tuple[int, int] = (32, 64),
        entry_channels: tuple[int, int, int] = (128, 256, 728),
        middle_blocks: int = 8,
        exit_channels: tuple[int, int, int] = (1024, 1536, 2048),
        dropout: float = 0.0,
        **kwargs,
    ) -> None:
        for name, values, length in (
            ("stem_channels", stem_channels, 2),
            ("entry_channels", entry_channels, 3),
            ("exit_channels", exit_channels, 3),
        ):
            if len(values) != length or min(values) < 1:
                raise ValueError(f"{name} must be {length} positive integers; got {values}")
        if middle_blocks < 0:
            raise ValueError(f"middle_blocks must be >= 0; got {middle_blocks}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1); got {dropout}")
        self.stem_channels = list(stem_channels)
        self.entry_channels = list(entry_channels)
        self.middle_blocks = middle_blocks
        self.exit_channels = list(exit_channels)
        self.dropout = dropout
        super().__init__(**kwargs)
