"""Configuration of HP-FCN (Li & Huang, ICCV 2019)."""

from __future__ import annotations

from ..modeling_utils import M3DDetectorConfig


class HPFCNConfig(M3DDetectorConfig):
    """Configuration of `HPFCNForForgeryDetection`; defaults are the paper's.

    Args:
        train_high_pass: whether the first-order derivative filters of the first layer are trained
            (the paper initialises them and trains them).
        base_depths: bottleneck widths of the four blocks (32, 64, 128, 256; outputs are 4x).
        units_per_block: pre-activation bottleneck units per block (2).
        decoder_channels: channels after the first transposed conv (64) and the second (4).
        focal_gamma: focusing parameter of the focal loss on the map (2).
    """

    model_type = "m3d_hpfcn"
    presets = {
        "tiny": dict(base_depths=(4, 4, 8, 8), units_per_block=1, decoder_channels=(8, 4)),
        "default": {},
    }

    def __init__(
        self,
        train_high_pass: bool = True,
        base_depths: tuple[int, ...] = (32, 64, 128, 256),
        units_per_block: int = 2,
        decoder_channels: tuple[int, int] = (64, 4),
        focal_gamma: float = 2.0,
        **kwargs,
    ) -> None:
        if len(base_depths) != 4 or min(base_depths) < 1:
            raise ValueError(f"base_depths must be four positive integers; got {base_depths}")
        if units_per_block < 1 or len(decoder_channels) != 2 or min(decoder_channels) < 1:
            raise ValueError("units_per_block must be >= 1 and decoder_channels two positive integers")
        if focal_gamma < 0:
            raise ValueError(f"focal_gamma must be >= 0; got {focal_gamma}")
        self.train_high_pass = train_high_pass
        self.base_depths = list(base_depths)
        self.units_per_block = units_per_block
        self.decoder_channels = list(decoder_channels)
        self.focal_gamma = focal_gamma
        super().__init__(**kwargs)
