"""The general-purpose real/fake detector (a ResNet-50 without its first stride) and the bottleneck
ResNet backbone it shares with MVSS-Net. Written without torchvision (which does not import beside
this torch)."""

from __future__ import annotations

import torch
from torch import nn

from ..modeling_utils import DetectorOutput, M3DDetectorPreTrainedModel
from .configuration_resnet_gp import ResNetGPConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ResNetBottleneck(nn.Module):
    """1x1 reduce -> 3x3 (stride, dilation) -> 1x1 expand, each with BatchNorm; residual + ReLU."""

    def __init__(
        self,
        in_channels: int,
        width: int,
        stride: int = 1,
        dilation: int = 1,
        expansion: int = 4,
    ) -> None:
        super().__init__()
        out_channels = width * expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        else:
            self.downsample = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetBackbone(nn.Module):
    """A bottleneck ResNet without its classifier: ``forward(x)`` returns the outputs of the four stages.

    Args:
        layers: blocks per stage (ResNet-50: 3, 4, 6, 3).
        widths: bottleneck widths per stage (64, 128, 256, 512); the stem has ``widths[0]`` channels.
        in_channels: input channels of the 7x7 stem conv.
        stem_stride: stride of the 7x7 stem conv (2; 1 removes the conv's down-sampling).
        replace_stride_with_dilation: per stage 2-4, replace the stride-2 by dilation (torchvision's
            convention: the first block of a dilated stage keeps the previous dilation).
        expansion: channel expansion of the bottleneck (4).
        pool_stride: stride of the 3x3 stem max-pool (2; Corvi et al.'s "res50stride1" sets both
            ``stem_stride`` and ``pool_stride`` to 1, as its reference code's ``stride0=1`` does).

    ``out_channels``: the channels of the four stage outputs (``widths[i] * expansion``).
    """

    def __init__(
        self,
        layers: tuple[int, ...] = (3, 4, 6, 3),
        widths: tuple[int, ...] = (64, 128, 256, 512),
        in_channels: int = 3,
        stem_stride: int = 2,
        replace_stride_with_dilation: tuple[bool, bool, bool] = (False, False, False),
        expansion: int = 4,
        pool_stride: int = 2,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or len(widths) != 4 or min(layers) < 1 or min(widths) < 1:
            raise ValueError(f"layers and widths must be four positive integers; got {layers} and {widths}")
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(f"replace_stride_with_dilation needs 3 flags; got {replace_stride_with_dilation}")
        if stem_stride not in (1, 2) or pool_stride not in (1, 2):
            raise ValueError(f"stem_stride and pool_stride must be 1 or 2; got {stem_stride} and {pool_stride}")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 7, stride=stem_stride, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=pool_stride, padding=1)
        channels, dilation = widths[0], 1
        stages = []
        for index, (blocks, width) in enumerate(zip(layers, widths)):
            stride = 1 if index == 0 else 2
            previous_dilation = dilation
            if index > 0 and replace_stride_with_dilation[index - 1]:
                dilation *= stride
                stride = 1
            stage = [ResNetBottleneck(channels, width, stride, previous_dilation, expansion)]
            channels = width * expansion
            stage += [ResNetBottleneck(channels, width, 1, dilation, expansion) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_channels = [w * expansion for w in widths]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outputs = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            outputs.append(x)
        return outputs


class ResNetGPForForgeryDetection(M3DDetectorPreTrainedModel):
    """General-purpose synthetic-image detector of Corvi et al. ("On the detection of synthetic images
    generated by diffusion models", ICASSP 2023; grip-unina/DMimageDetection, architecture
    "res50stride1"), used by M3Dsynth as the general-purpose baseline.

    Key components: a ResNet-50 (bottlenecks 3/4/6/3, widths 64-2048, `ResNetBackbone`) whose stem
    has no down-sampling — the reference's ``stride0=1`` sets the stride of both the 7x7 conv and the
    3x3 max-pool to 1, so high-frequency traces survive and the last stage is at 1/8 of the input —
    then global average pooling and one linear logit. The reference applies the linear layer at every
    position and averages the logits, which is the same function. Inputs in [-1, 1] are mapped to
    [0, 1] and normalised with ImageNet statistics inside the model (``imagenet_normalize``). Any
    input size works. Loss: BCE on the image logit (`standard_loss`).

    Cost: without the stem strides layer1 runs at full resolution, about 16x the FLOPs of a standard
    ResNet-50 at the same input size.

    Default config: 23,510,081 params (original: ResNet-50 with one output, 23.5 M).
    """

    config_class = ResNetGPConfig
    localizes = False

    def __init__(self, config: ResNetGPConfig) -> None:
        super().__init__(config)
        if config.imagenet_normalize and config.num_channels != 3:
            raise ValueError(f"imagenet_normalize needs num_channels=3; got {config.num_channels}")
        self.backbone = ResNetBackbone(
            layers=tuple(config.layers),
            widths=tuple(config.widths),
            in_channels=config.num_channels,
            stem_stride=config.stem_stride,
            pool_stride=config.pool_stride,
        )
        self.classifier = nn.Linear(self.backbone.out_channels[-1], 1)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DetectorOutput:
        x = pixel_values
        if self.config.imagenet_normalize:
            mean, std = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1), x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
            x = ((x + 1) / 2 - mean) / std
        features = self.backbone(x)[-1]
        logits = self.classifier(features.mean(dim=(2, 3))).squeeze(1)
        output = DetectorOutput(loss=self.standard_loss(logits, None, labels, None), logits=logits)
        return output if return_dict else output.to_tuple()
