"""U-Net as a per-pixel manipulation localizer."""

from __future__ import annotations

import torch
from torch import nn

from ..modeling_utils import DetectorOutput, M3DDetectorPreTrainedModel
from .configuration_unet import UNetConfig


def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two padded 3x3 conv -> BN -> ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def pool_logits(localization_logits: torch.Tensor, pooling: str) -> torch.Tensor:
    """Image logit from a logit map: global max (default) or mean pooling."""
    flat = localization_logits.flatten(1)
    return flat.amax(1) if pooling == "max" else flat.mean(1)


class UNetForForgeryDetection(M3DDetectorPreTrainedModel):
    """U-Net (Ronneberger, Fischer & Brox, "U-Net: Convolutional Networks for Biomedical Image
    Segmentation", MICCAI 2015) as a per-pixel manipulation localizer.

    Key components: ``depth`` (4) levels, five resolutions, each two padded 3x3 conv + BN + ReLU
    (the paper's convs are unpadded and have no BN; padding keeps the map at the input size), 2x2
    max-pooling, widths ``base_channels * 2**level`` (64 -> 1024), 2x2 stride-2 transposed-conv
    up-sampling with skip concatenation, a 1x1 conv to one localization logit.

    Image logit: the global **max** of the logit map (``image_pooling="max"``, default: a slice is
    as manipulated as its most manipulated pixel); ``"mean"`` is the other option; no soft/LSE
    pooling. Loss: `standard_loss` (BCE on the image logit, BCE + Dice on the map).

    Inputs must be multiples of ``2**depth`` (16 by default). Default config: 31,037,633 params
    (original at base 64 with padded convs and BN: 31.0 M).
    """

    config_class = UNetConfig

    def __init__(self, config: UNetConfig) -> None:
        super().__init__(config)
        widths = [config.base_channels * 2**level for level in range(config.depth + 1)]
        self.encoder = nn.ModuleList([double_conv(config.num_channels, widths[0])])
        self.encoder.extend(double_conv(widths[i], widths[i + 1]) for i in range(config.depth))
        self.pool = nn.MaxPool2d(2)
        self.upsample = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(config.depth))
        )
        self.decoder = nn.ModuleList(double_conv(2 * widths[i], widths[i]) for i in reversed(range(config.depth)))
        self.head = nn.Conv2d(widths[0], 1, 1)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DetectorOutput:
        multiple = 2**self.config.depth
        if pixel_values.shape[-1] % multiple or pixel_values.shape[-2] % multiple:
            raise ValueError(
                f"U-Net input height and width must be multiples of {multiple}; got {tuple(pixel_values.shape[-2:])}"
            )
        skips, x = [], pixel_values
        for level, block in enumerate(self.encoder):
            x = block(x if level == 0 else self.pool(x))
            skips.append(x)
        for upsample, block, skip in zip(self.upsample, self.decoder, reversed(skips[:-1])):
            x = block(torch.cat([skip, upsample(x)], dim=1))
        localization_logits = self.head(x)
        logits = pool_logits(localization_logits, self.config.image_pooling)
        loss = self.standard_loss(logits, localization_logits, labels, masks)
        output = DetectorOutput(loss=loss, logits=logits, localization_logits=localization_logits)
        return output if return_dict else output.to_tuple()
