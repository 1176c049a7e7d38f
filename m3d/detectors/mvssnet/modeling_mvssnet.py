"""MVSS-Net (Chen, Dong, Li, Wang & Wang, "Image Manipulation Detection by Multi-View Multi-Scale
Supervision", ICCV 2021): an edge-supervised RGB branch and a noise-sensitive (Bayar) branch fused by a
dual-attention head. Reference: dong03/MVSS-Net (``models/mvssnet.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling_utils import BayarConv2d, DetectorOutput, M3DDetectorPreTrainedModel
from ..resnet_gp.modeling_resnet_gp import ResNetBackbone
from .configuration_mvssnet import MVSSNetConfig

SOBEL_X = ((1.0, 0.0, -1.0), (2.0, 0.0, -2.0), (1.0, 0.0, -1.0))
SOBEL_Y = ((1.0, 2.0, 1.0), (0.0, 0.0, 0.0), (-1.0, -2.0, -1.0))


def sobel_kernels() -> torch.Tensor:
    """``(2, 1, 3, 3)``: the horizontal and vertical Sobel kernels of the original code."""
    return torch.tensor([SOBEL_X, SOBEL_Y]).unsqueeze(1)


def squared_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """``1 - (2 sum(p g) + s) / (sum(g^2) + sum(p^2) + s)`` over the whole batch, p = sigmoid(logits)
    (the Dice form of the public MVSS-Net training port)."""
    probability = torch.sigmoid(logits.float()).flatten()
    target = target.float().flatten()
    overlap = (probability * target).sum()
    return 1 - (2 * overlap + smooth) / (target.square().sum() + probability.square().sum() + smooth)


def mask_boundary(masks: torch.Tensor, width: int = 5) -> torch.Tensor:
    """Edge target of a binary mask: ``dilate(mask) - erode(mask)`` with a ``width`` x ``width`` square,
    computed by max-pooling (the image border is not treated as a boundary)."""
    binary = (masks.float() > 0.5).float()
    dilated = F.max_pool2d(binary, width, stride=1, padding=width // 2)
    eroded = -F.max_pool2d(-binary, width, stride=1, padding=width // 2)
    return dilated - eroded


class MVSSSobelGate(nn.Module):
    """``sigmoid(|Sobel(x)|) * x``: the x/y Sobel kernels are applied to the sum of the channels (as the
    original's kernels repeated over every input channel), each followed by its own BatchNorm (one
    `BatchNorm2d(2)`, the same as two `BatchNorm2d(1)`). The kernels are a fixed persistent buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("kernels", sobel_kernels(), persistent=True)
        self.norm = nn.BatchNorm2d(2)

    def reset_kernels(self) -> None:
        with torch.no_grad():
            self.kernels.copy_(sobel_kernels())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gradients = self.norm(F.conv2d(x.sum(dim=1, keepdim=True), self.kernels.to(x.dtype), padding=1))
        magnitude = torch.sqrt(gradients.square().sum(dim=1, keepdim=True) + 1e-8)
        return torch.sigmoid(magnitude) * x


class MVSSEdgeResidualBlock(nn.Module):
    """ERB: 1x1 conv, then ``x + conv3x3(ReLU(BN(conv3x3(x))))``, optionally followed by ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.norm = nn.BatchNorm2d(out_channels)
        self.conv3 = nn.Conv2d(out_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, relu: bool = True) -> torch.Tensor:
        x = self.conv1(x)
        x = x + self.conv3(F.relu(self.norm(self.conv2(x))))
        return F.relu(x) if relu else x


class MVSSEdgeBranch(nn.Module):
    """Edge-supervised branch: per stage a Sobel gate and an ERB to one channel, merged progressively
    from the shallowest stage (1/4) with transition ERBs; returns edge logits at the first stage's size."""

    def __init__(self, in_channels: list[int], use_sobel: bool) -> None:
        super().__init__()
        self.sobel = nn.ModuleList(MVSSSobelGate() for _ in in_channels) if use_sobel else None
        self.stage_blocks = nn.ModuleList(MVSSEdgeResidualBlock(c, 1) for c in in_channels)
        self.transition_blocks = nn.ModuleList(MVSSEdgeResidualBlock(1, 1) for _ in in_channels[1:])

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        if self.sobel is not None:
            features = [gate(f) for gate, f in zip(self.sobel, features)]
        size = features[0].shape[-2:]
        edge = self.stage_blocks[0](features[0])
        last = len(self.transition_blocks) - 1
        for i, (block, transition) in enumerate(zip(self.stage_blocks[1:], self.transition_blocks)):
            stage = F.interpolate(block(features[i + 1]), size=size, mode="bilinear", align_corners=True)
            edge = transition(edge + stage, relu=i != last)
        return edge


class MVSSPositionAttention(nn.Module):
    """DANet position attention: ``alpha * (V softmax(Q^T K)) + x`` with ``alpha`` starting at 0."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        self.query = nn.Conv2d(channels, channels // reduction, 1)
        self.key = nn.Conv2d(channels, channels // reduction, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.alpha = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        query = self.query(x).flatten(2).transpose(1, 2)  # (B, N, C')
        key = self.key(x).flatten(2)  # (B, C', N)
        attention = torch.softmax(torch.bmm(query, key), dim=-1)  # (B, N, N)
        value = self.value(x).flatten(2)  # (B, C, N)
        out = torch.bmm(value, attention.transpose(1, 2)).view(batch, channels, height, width)
        return self.alpha * out + x


class MVSSChannelAttention(nn.Module):
    """DANet channel attention: ``beta * (softmax(max(E) - E) A) + x``, ``E = A A^T``, ``beta`` from 0."""

    def __init__(self) -> None:
        super().__init__()
        self.beta = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        flat = x.flatten(2)  # (B, C, N)
        energy = torch.bmm(flat, flat.transpose(1, 2))  # (B, C, C)
        attention = torch.softmax(energy.amax(dim=-1, keepdim=True) - energy, dim=-1)
        out = torch.bmm(attention, flat).view(batch, channels, height, width)
        return self.beta * out + x


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class MVSSDualAttentionHead(nn.Module):
    """DANet head: two 3x3 conv-BN-ReLU paths (position and channel attention), summed, then dropout
    and a 1x1 conv to one logit."""

    def __init__(self, in_channels: int, reduction: int, attention_reduction: int, dropout: float) -> None:
        super().__init__()
        inter = in_channels // reduction
        self.position_in = _conv_bn_relu(in_channels, inter)
        self.channel_in = _conv_bn_relu(in_channels, inter)
        self.position_attention = MVSSPositionAttention(inter, attention_reduction)
        self.channel_attention = MVSSChannelAttention()
        self.position_out = _conv_bn_relu(inter, inter)
        self.channel_out = _conv_bn_relu(inter, inter)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Conv2d(inter, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        position = self.position_out(self.position_attention(self.position_in(x)))
        channel = self.channel_out(self.channel_attention(self.channel_in(x)))
        return self.classifier(self.dropout(position + channel))


def build_backbone(config: MVSSNetConfig, in_channels: int) -> ResNetBackbone:
    return ResNetBackbone(
        layers=tuple(config.backbone_layers),
        widths=tuple(config.backbone_widths),
        in_channels=in_channels,
        stem_stride=2,
        replace_stride_with_dilation=(False, False, config.dilate_last_stage),
        expansion=config.backbone_expansion,
    )


class MVSSNetForForgeryDetection(M3DDetectorPreTrainedModel):
    """MVSS-Net (Chen et al., "Image Manipulation Detection by Multi-View Multi-Scale Supervision",
    ICCV 2021; code dong03/MVSS-Net).

    Key components:
    - **RGB branch**: a ResNet-50 (`ResNetBackbone`) with a dilated last stage, features at 1/4, 1/8,
      1/16, 1/16 (256 / 512 / 1024 / 2048 channels). The last stage's dilations follow torchvision's
      convention (1, 2, 2) where the original's DeepLab-v3 layer4 uses (1, 2, 4): same weights and
      output stride, a slightly smaller receptive field.
    - **Edge-supervised branch**: each stage gated by ``sigmoid(|Sobel|)`` (fixed Sobel kernels, a
      persistent buffer, with BatchNorm), an edge residual block (ERB) to one channel, merged
      progressively with transition ERBs into edge logits at 1/4 (``auxiliary``, upsampled to the input).
    - **Noise-sensitive branch**: grey image -> Bayar-constrained 5x5 conv (1 -> 3; call
      `register_bayar_constraint(optimizer, model)` when training) -> a second ResNet-50.
    - **Fusion**: both last-stage features concatenated (4096 ch) -> DANet position + channel attention
      head -> 1x1 conv -> bilinear upsampling to the input size = ``localization_logits``.
    - **Image logit**: global max pooling of the map (the paper's GMP).
    - **Loss**: ``0.16 Dice(map, mask) + 0.04 BCE(GMP(map), label) + 0.80 Dice(edges, edge target)``, the
      edge target being ``dilate(mask) - erode(mask)`` max-pooled to the edge map's 1/4 size; when only
      ``masks`` are given the labels are ``mask.any()``, when only ``labels`` only the BCE term is used.

    Input: ``(B, 3, H, W)`` in [-1, 1] (no ImageNet normalisation: no ImageNet weights are loaded);
    H and W of at least 32 (multiples of 16 keep the feature grids exact).
    Default config: 142,713,218 parameters, 95,693,059 in the head (original: ~146.9 M, 95.7 M head;
    the original's count also holds the two ResNets' unused ImageNet ``fc`` layers, 2 x 2,049,000, and
    its Sobel kernels repeated over the input channels as frozen parameters, 69,120 — here the Sobel
    kernels are a 72-value buffer; with those the two models match to 0.01 %).
    """

    config_class = MVSSNetConfig
    base_model_prefix = "mvssnet"
    localizes = True

    def __init__(self, config: MVSSNetConfig) -> None:
        super().__init__(config)
        self.backbone = build_backbone(config, config.num_channels)
        stage_channels = list(self.backbone.out_channels)
        self.edge_branch = MVSSEdgeBranch(stage_channels, config.use_sobel)
        fused = stage_channels[-1]
        if config.use_noise_branch:
            self.register_buffer("grey_weights", torch.tensor(config.grey_weights).view(1, -1, 1, 1), persistent=False)
            self.bayar = BayarConv2d(1, config.noise_channels, config.bayar_kernel_size)
            self.noise_backbone = build_backbone(config, config.noise_channels)
            fused += list(self.noise_backbone.out_channels)[-1]
        else:
            self.bayar = None
            self.noise_backbone = None
        self.head = MVSSDualAttentionHead(
            fused, config.head_reduction, config.attention_reduction, config.head_dropout
        )
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, MVSSSobelGate):
            module.reset_kernels()  # fixed filters: the same values whether freshly built or loaded
        elif isinstance(module, MVSSPositionAttention):
            nn.init.zeros_(module.alpha)
        elif isinstance(module, MVSSChannelAttention):
            nn.init.zeros_(module.beta)
        elif module is self and self.config.use_noise_branch:
            with torch.no_grad():  # non-persistent buffer: refill after meta-device loading
                self.grey_weights.copy_(torch.tensor(self.config.grey_weights).view(1, -1, 1, 1))

    def edge_target(self, masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The edge target at ``size``: the mask boundary band, max-pooled so thin edges survive."""
        boundary = mask_boundary(masks, self.config.edge_width)
        return F.adaptive_max_pool2d(boundary, size) if boundary.shape[-2:] != size else boundary

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DetectorOutput | tuple:
        self.check_pixel_values(pixel_values)
        if min(pixel_values.shape[-2:]) < 32:
            raise ValueError(f"MVSS-Net needs H, W >= 32; got {tuple(pixel_values.shape[-2:])}")
        size = pixel_values.shape[-2:]
        features = self.backbone(pixel_values)
        edge_logits = self.edge_branch(list(features))
        fused = features[-1]
        if self.noise_backbone is not None:
            grey = (pixel_values * self.grey_weights.to(pixel_values.dtype)).sum(dim=1, keepdim=True)
            noise = self.noise_backbone(self.bayar(grey))[-1]
            fused = torch.cat([fused, noise], dim=1)
        segmentation = self.head(fused)
        localization_logits = F.interpolate(segmentation, size=size, mode="bilinear", align_corners=True)
        logits = localization_logits.flatten(1).amax(dim=1)  # global max pooling
        auxiliary = F.interpolate(edge_logits, size=size, mode="bilinear", align_corners=True)

        loss = None
        if masks is not None or labels is not None:
            config = self.config
            terms = []
            if masks is not None:
                masks = masks.float().view_as(localization_logits)
                terms.append(
                    config.seg_loss_weight * squared_dice_loss(localization_logits, masks, config.dice_smooth)
                )
                edge = self.edge_target(masks, tuple(edge_logits.shape[-2:]))
                terms.append(config.edge_loss_weight * squared_dice_loss(edge_logits, edge, config.dice_smooth))
                if labels is None:
                    labels = (masks.flatten(1).amax(dim=1) > 0.5).float()
            bce = F.binary_cross_entropy_with_logits(logits.float(), labels.float().view_as(logits))
            terms.append(config.clf_loss_weight * bce)
            loss = torch.stack(terms).sum()
        if not return_dict:
            return tuple(v for v in (loss, logits, localization_logits, auxiliary) if v is not None)
        return DetectorOutput(loss=loss, logits=logits, localization_logits=localization_logits, auxiliary=auxiliary)
