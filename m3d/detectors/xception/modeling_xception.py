"""Xception as a slice-level real/fake classifier."""

from __future__ import annotations

import torch
from torch import nn

from ..modeling_utils import DetectorOutput, M3DDetectorPreTrainedModel
from .configuration_xception import XceptionConfig


class SeparableConv2d(nn.Sequential):
    """Depthwise 3x3 followed by pointwise 1x1, both without bias."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
        )


class XceptionBlock(nn.Module):
    """``reps`` x (ReLU -> separable conv -> BN), optional 3x3/2 max-pool, plus a (1x1 conv) shortcut."""

    def __init__(
        self, in_channels: int, out_channels: int, reps: int, stride: int, start_with_relu: bool, grow_first: bool
    ):
        super().__init__()
        self.skip = (
            nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )
            if out_channels != in_channels or stride != 1
            else nn.Identity()
        )
        widths = [in_channels] + [out_channels] * reps if grow_first else [in_channels] * reps + [out_channels]
        layers: list[nn.Module] = []
        for index in range(reps):
            if index > 0 or start_with_relu:
                layers.append(nn.ReLU(inplace=index > 0))  # the first sees the block input, which the shortcut reuses
            layers += [SeparableConv2d(widths[index], widths[index + 1]), nn.BatchNorm2d(widths[index + 1])]
        if stride != 1:
            layers.append(nn.MaxPool2d(3, stride, 1))
        self.rep = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rep(x) + self.skip(x)


class XceptionForForgeryDetection(M3DDetectorPreTrainedModel):
    """Xception (Chollet, "Xception: Deep Learning with Depthwise Separable Convolutions", CVPR 2017)
    as the detection-only (image-level) baseline of M3Dsynth, in timm's ``legacy_xception`` layout.

    Key components: entry flow (stem 3x3/2 conv 32 + 3x3 conv 64, then blocks of separable convs to
    128, 256 and 728, each ending in a 3x3/2 max-pool with a strided 1x1 conv + BN shortcut), middle
    flow (8 residual blocks of three ReLU-separable conv-BN at 728), exit flow (block 728 -> 728 ->
    1024 with a strided shortcut, separable 1536 and 2048 with BN + ReLU), global average pooling,
    dropout (0 by default) and one linear logit. Loss: BCE on the image logit (`standard_loss`). It
    does not localize (``localization_logits`` is None).

    The stem convs are padded (the original's are not) so the feature map stays at 1/32 of the
    input; any input size works. Default config: 20,809,001 params (original, timm
    ``legacy_xception`` with one output: 20.8 M).
    """

    config_class = XceptionConfig
    localizes = False

    def __init__(self, config: XceptionConfig) -> None:
        super().__init__(config)
        stem_a, stem_b = config.stem_channels
        entry, exit_ = config.entry_channels, config.exit_channels
        self.stem = nn.Sequential(
            nn.Conv2d(config.num_channels, stem_a, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(stem_a),
            nn.ReLU(),
            nn.Conv2d(stem_a, stem_b, 3, padding=1, bias=False),
            nn.BatchNorm2d(stem_b),
            nn.ReLU(),
        )
        blocks = [
            XceptionBlock(stem_b, entry[0], 2, 2, start_with_relu=False, grow_first=True),
            XceptionBlock(entry[0], entry[1], 2, 2, start_with_relu=True, grow_first=True),
            XceptionBlock(entry[1], entry[2], 2, 2, start_with_relu=True, grow_first=True),
        ]
        blocks += [XceptionBlock(entry[2], entry[2], 3, 1, True, True) for _ in range(config.middle_blocks)]
        blocks.append(XceptionBlock(entry[2], exit_[0], 2, 2, start_with_relu=True, grow_first=False))
        self.blocks = nn.Sequential(*blocks)
        self.exit = nn.Sequential(
            SeparableConv2d(exit_[0], exit_[1]),
            nn.BatchNorm2d(exit_[1]),
            nn.ReLU(),
            SeparableConv2d(exit_[1], exit_[2]),
            nn.BatchNorm2d(exit_[2]),
            nn.ReLU(),
        )
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(exit_[2], 1)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DetectorOutput:
        features = self.exit(self.blocks(self.stem(pixel_values)))
        logits = self.classifier(self.dropout(features.mean(dim=(2, 3)))).squeeze(1)
        output = DetectorOutput(loss=self.standard_loss(logits, None, labels, None), logits=logits)
        return output if return_dict else output.to_tuple()
