"""TruFor (Guillaro, Cozzolino, Sud, Dufour & Verdoliva, "TruFor: Leveraging all-round clues for
trustworthy image forgery detection and localization", CVPR 2023). Reference: grip-unina/TruFor
(``models/cmx/``: ``builder_np_conf.py``, ``encoders/dual_segformer.py``, ``net_utils.py``,
``decoders/MLPDecoder.py``, ``layer_utils.py``; ``models/DnCNN.py``; ``core/criterion*.py``).

The MiT streams are built from transformers' Segformer blocks (`SegformerOverlapPatchEmbeddings`,
`SegformerLayer`), so their attention dispatches through ``config._attn_implementation`` (SDPA by
default); every other piece is batched tensor code (no Python loop over pixels or samples).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.segformer.modeling_segformer import SegformerLayer, SegformerOverlapPatchEmbeddings

from ..modeling_utils import DetectorOutput, M3DDetectorPreTrainedModel
from .configuration_trufor import IMAGENET_MEAN, IMAGENET_STD, TRAINING_PHASES, TruForConfig

# ----------------------------------------------------------------------------------------------------
# Noiseprint++
# ----------------------------------------------------------------------------------------------------


class TruForNoiseprint(nn.Sequential):
    """Noiseprint++ extractor: a DnCNN of ``num_layers`` convolutions (no residual connection).

    Layer layout (the indices match the original ``make_net`` ``nn.Sequential``, so a released
    ``noiseprint++.th`` ``network`` state dict loads directly into this module): conv (with bias) + ReLU,
    then ``num_layers - 2`` x [conv (no bias) + BatchNorm + ReLU], then a linear conv (with bias) to
    ``out_channels``. A 1-channel noiseprint is tiled to 3 channels for the encoder.

    When ``frozen`` (TruFor's default in every training phase) the parameters do not require gradients
    and the module stays in eval mode (BatchNorm on running statistics) even inside ``model.train()``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_layers: int = 17,
        channels: int = 64,
        kernel_size: int = 3,
        out_channels: int = 1,
        bn_momentum: float = 0.1,
        frozen: bool = True,
    ) -> None:
        layers: list[nn.Module] = []
        for index in range(num_layers):
            first, last = index == 0, index == num_layers - 1
            width_in = in_channels if first else channels
            width_out = out_channels if last else channels
            batch_norm = not (first or last)
            layers.append(nn.Conv2d(width_in, width_out, kernel_size, padding=kernel_size // 2, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width_out, momentum=bn_momentum))
            if not last:
                layers.append(nn.ReLU())
        super().__init__(*layers)
        self.out_channels = out_channels
        self.frozen = False
        self.set_frozen(frozen)

    def set_frozen(self, frozen: bool) -> None:
        self.frozen = bool(frozen)
        for parameter in self.parameters():
            parameter.requires_grad_(not self.frozen)
        if self.frozen:
            self.eval()

    def train(self, mode: bool = True) -> "TruForNoiseprint":
        return super().train(mode and not self.frozen)

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        """``images01``: ``(B, 3, H, W)`` in [0, 1] (what Noiseprint++ was trained on) -> ``(B, 3, H, W)``."""
        noiseprint = super().forward(images01)
        if self.out_channels == 1:
            noiseprint = noiseprint.expand(-1, 3, -1, -1)
        return noiseprint


class TruForRGBNormalization(nn.Module):
    """How the [0, 1] image enters the RGB stream: ``(x - mean) / std`` per channel (ImageNet statistics
    for ``"imagenet"``, 0.5 / 0.5 for ``"xception"``, 0 / 1 for ``"none"``); fixed non-persistent buffers
    (re-filled by ``_init_weights`` after loading)."""

    def __init__(self, preprocessing: str) -> None:
        super().__init__()
        self.preprocessing = preprocessing
        mean, std = self.statistics(preprocessing)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    @staticmethod
    def statistics(preprocessing: str) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "xception": ((0.5,) * 3, (0.5,) * 3)}.get(
            preprocessing, ((0.0,) * 3, (1.0,) * 3)
        )
        return torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    def reset_statistics(self) -> None:
        mean, std = self.statistics(self.preprocessing)
        with torch.no_grad():
            self.mean.copy_(mean)
            self.std.copy_(std)

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return (images01 - self.mean.to(images01.dtype)) / self.std.to(images01.dtype)


# ----------------------------------------------------------------------------------------------------
# Encoder: two MiT streams with FRM + FFM after every stage (CMX)
# ----------------------------------------------------------------------------------------------------


class TruForMiTStage(nn.Module):
    """One MiT stage from transformers' Segformer blocks: overlapping patch embedding -> ``depth``
    `SegformerLayer` blocks (efficient self-attention with key/value reduction + Mix-FFN) -> LayerNorm.

    Maps ``(B, C_in, H, W)`` to ``(B, C, H / stride, W / stride)``; the output is a channels-last strided
    view of the token tensor (no copy), which the convolutions of FRM/FFM and the next patch embedding
    consume as is.
    """

    def __init__(self, config: TruForConfig, stage: int, in_channels: int, drop_path_rates: list[float]) -> None:
        super().__init__()
        hidden_size = config.hidden_sizes[stage]
        self.patch_embeddings = SegformerOverlapPatchEmbeddings(
            patch_size=config.patch_sizes[stage],
            stride=config.strides[stage],
            num_channels=in_channels,
            hidden_size=hidden_size,
        )
        self.blocks = nn.ModuleList(
            SegformerLayer(
                config,
                hidden_size=hidden_size,
                num_attention_heads=config.num_attention_heads[stage],
                drop_path=rate,
                sequence_reduction_ratio=config.sr_ratios[stage],
                mlp_ratio=config.mlp_ratios[stage],
            )
            for rate in drop_path_rates
        )
        for block in self.blocks:  # the original MiT blocks use LayerNorm(eps=1e-6)
            block.layernorm_before.eps = config.layer_norm_eps
            block.layernorm_after.eps = config.layer_norm_eps
        self.layer_norm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        tokens, height, width = self.patch_embeddings(hidden_states)
        for block in self.blocks:
            tokens = block(tokens, height, width)
        tokens = self.layer_norm(tokens)
        return tokens.unflatten(1, (height, width)).permute(0, 3, 1, 2)


class TruForChannelWeights(nn.Module):
    """FRM channel weights: avg- and max-pooled ``[x1, x2]`` (4C) -> Linear 4C->4C/r -> ReLU ->
    Linear -> 2C -> sigmoid; returns the weights ``(B, C, 1, 1)`` for ``x1`` and for ``x2``."""

    def __init__(self, dim: int, reduction: int = 1) -> None:
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(
            nn.Linear(4 * dim, 4 * dim // reduction),
            nn.ReLU(),
            nn.Linear(4 * dim // reduction, 2 * dim),
            nn.Sigmoid(),
        )

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        both = torch.cat((x1, x2), dim=1)
        pooled = torch.cat((both.mean(dim=(2, 3)), both.amax(dim=(2, 3))), dim=1)
        weights = self.mlp(pooled).view(-1, 2, self.dim, 1, 1)
        return weights[:, 0], weights[:, 1]


class TruForSpatialWeights(nn.Module):
    """FRM spatial weights: ``[x1, x2]`` (2C) -> 1x1 conv -> C/r -> ReLU -> 1x1 conv -> 2 -> sigmoid;
    returns the weights ``(B, 1, H, W)`` for ``x1`` and for ``x2``."""

    def __init__(self, dim: int, reduction: int = 1) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Conv2d(2 * dim, dim // reduction, kernel_size=1),
            nn.ReLU(),
            nn.Conv2d(dim // reduction, 2, kernel_size=1),
            nn.Sigmoid(),
        )

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = self.mlp(torch.cat((x1, x2), dim=1))
        return weights[:, 0:1], weights[:, 1:2]


class TruForFeatureRectifyModule(nn.Module):
    """FRM (CMX): each stream is rectified by the other one,
    ``x1 + lc * cw_2 * x2 + ls * sw_2 * x2`` and ``x2 + lc * cw_1 * x1 + ls * sw_1 * x1``
    (``cw``/``sw``: the channel/spatial weights computed from both streams; ``lc = ls = 0.5``)."""

    def __init__(self, dim: int, reduction: int = 1, lambda_channel: float = 0.5, lambda_spatial: float = 0.5) -> None:
        super().__init__()
        self.lambda_channel = lambda_channel
        self.lambda_spatial = lambda_spatial
        self.channel_weights = TruForChannelWeights(dim, reduction)
        self.spatial_weights = TruForSpatialWeights(dim, reduction)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        channel_1, channel_2 = self.channel_weights(x1, x2)
        spatial_1, spatial_2 = self.spatial_weights(x1, x2)
        out_1 = x1 + (self.lambda_channel * channel_2 + self.lambda_spatial * spatial_2) * x2
        out_2 = x2 + (self.lambda_channel * channel_1 + self.lambda_spatial * spatial_1) * x1
        return out_1, out_2


class TruForCrossAttn(nn.Module):
    """FFM cross-attention over a channel context: per head, ``context = softmax_rows(K^T V * scale)``
    (``d x d``, from one stream's tokens) and each stream's queries (its tokens themselves) read the
    other stream's context, ``Q_1 @ context_2``. Linear in the number of tokens.

    The original's ``CrossAttention``; named ``...Attn`` because transformers only lets
    ``set_attn_implementation`` switch the MiT blocks' attention at run time when the modeling file has
    no ``*Attention(nn.Module)`` class outside its attention interface."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.kv1 = nn.Linear(dim, 2 * dim, bias=False)
        self.kv2 = nn.Linear(dim, 2 * dim, bias=False)

    def _context(self, tokens: torch.Tensor, kv: nn.Linear) -> torch.Tensor:
        batch, length, dim = tokens.shape
        key, value = kv(tokens).view(batch, length, 2, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        return (key.transpose(-2, -1) @ value * self.scale).softmax(dim=-2)  # (B, heads, d, d)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length, dim = x1.shape
        head_shape = (batch, length, self.num_heads, dim // self.num_heads)
        context_1, context_2 = self._context(x1, self.kv1), self._context(x2, self.kv2)
        out_1 = x1.view(head_shape).transpose(1, 2) @ context_2
        out_2 = x2.view(head_shape).transpose(1, 2) @ context_1
        return out_1.transpose(1, 2).reshape(batch, length, dim), out_2.transpose(1, 2).reshape(batch, length, dim)


class TruForCrossPath(nn.Module):
    """FFM stage 1: per stream Linear C -> 2C/r + ReLU split into a kept half and an attended half,
    cross-attention between the attended halves, concat, Linear back to C, residual + LayerNorm."""

    def __init__(self, dim: int, reduction: int, num_heads: int) -> None:
        super().__init__()
        inner = dim // reduction
        self.channel_proj1 = nn.Linear(dim, 2 * inner)
        self.channel_proj2 = nn.Linear(dim, 2 * inner)
        self.cross_attn = TruForCrossAttn(inner, num_heads)
        self.end_proj1 = nn.Linear(2 * inner, dim)
        self.end_proj2 = nn.Linear(2 * inner, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kept_1, attend_1 = F.relu(self.channel_proj1(x1)).chunk(2, dim=-1)
        kept_2, attend_2 = F.relu(self.channel_proj2(x2)).chunk(2, dim=-1)
        attended_1, attended_2 = self.cross_attn(attend_1, attend_2)
        out_1 = self.norm1(x1 + self.end_proj1(torch.cat((kept_1, attended_1), dim=-1)))
        out_2 = self.norm2(x2 + self.end_proj2(torch.cat((kept_2, attended_2), dim=-1)))
        return out_1, out_2


class TruForChannelEmbed(nn.Module):
    """FFM stage 2: ``BN(conv1x1(x) + [conv1x1 -> dwconv3x3 -> ReLU -> conv1x1 -> BN](x))``, 2C -> C."""

    def __init__(self, in_channels: int, out_channels: int, reduction: int = 1) -> None:
        super().__init__()
        inner = out_channels // reduction
        self.residual = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.channel_embed = nn.Sequential(
            nn.Conv2d(in_channels, inner, kernel_size=1),
            nn.Conv2d(inner, inner, kernel_size=3, padding=1, groups=inner),
            nn.ReLU(),
            nn.Conv2d(inner, out_channels, kernel_size=1),
            nn.BatchNorm2d(out_channels),
        )
        self.norm = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.residual(x) + self.channel_embed(x))


class TruForFeatureFusionModule(nn.Module):
    """FFM (CMX): cross-path exchange on the token sequences, then the channel embedding of the
    concatenated streams -> one fused ``(B, C, H, W)`` map."""

    def __init__(self, dim: int, reduction: int, num_heads: int) -> None:
        super().__init__()
        self.cross = TruForCrossPath(dim, reduction, num_heads)
        self.channel_emb = TruForChannelEmbed(2 * dim, dim, reduction)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        height, width = x1.shape[-2:]
        tokens_1, tokens_2 = self.cross(x1.flatten(2).transpose(1, 2), x2.flatten(2).transpose(1, 2))
        merged = torch.cat((tokens_1, tokens_2), dim=-1)  # (B, N, 2C)
        return self.channel_emb(merged.transpose(1, 2).unflatten(2, (height, width)))


class TruForDualEncoder(nn.Module):
    """CMX encoder: an RGB and a Noiseprint++ MiT stream; after every stage the FRM rectifies both
    streams (which continue rectified) and the FFM fuses them into the stage's output map."""

    def __init__(self, config: TruForConfig) -> None:
        super().__init__()
        total = sum(config.depths)  # stochastic depth rising linearly from 0 to drop_path_rate
        rates = [config.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        starts = [sum(config.depths[:stage]) for stage in range(4)]

        def stream() -> nn.ModuleList:
            return nn.ModuleList(
                TruForMiTStage(
                    config,
                    stage,
                    config.num_channels if stage == 0 else config.hidden_sizes[stage - 1],
                    rates[starts[stage] : starts[stage] + config.depths[stage]],
                )
                for stage in range(4)
            )

        self.rgb_stages = stream()
        self.noise_stages = stream()
        self.frms = nn.ModuleList(
            TruForFeatureRectifyModule(
                size, config.frm_reduction, config.frm_lambda_channel, config.frm_lambda_spatial
            )
            for size in config.hidden_sizes
        )
        self.ffms = nn.ModuleList(
            TruForFeatureFusionModule(size, config.ffm_reduction, heads)
            for size, heads in zip(config.hidden_sizes, config.num_attention_heads)
        )

    def forward(self, rgb: torch.Tensor, noise: torch.Tensor) -> list[torch.Tensor]:
        fused = []
        for rgb_stage, noise_stage, frm, ffm in zip(self.rgb_stages, self.noise_stages, self.frms, self.ffms):
            rgb, noise = frm(rgb_stage(rgb), noise_stage(noise))
            fused.append(ffm(rgb, noise))
        return fused


# ----------------------------------------------------------------------------------------------------
# Decoders and detection head
# ----------------------------------------------------------------------------------------------------


class TruForMLPDecoder(nn.Module):
    """SegFormer all-MLP decoder (TruFor's ``DecoderHead``): per stage a Linear to ``hidden_size``,
    bilinear upsampling to the first stage's 1/4 grid, concat (deepest first) -> 1x1 conv (with bias) ->
    BatchNorm -> ReLU -> Dropout2d -> 1x1 conv to ``num_outputs`` logits at 1/4 of the input."""

    def __init__(
        self, in_channels: list[int], num_outputs: int, hidden_size: int, dropout: float, batch_norm_eps: float
    ) -> None:
        super().__init__()
        self.linear_c = nn.ModuleList(nn.Linear(channels, hidden_size) for channels in in_channels)
        self.linear_fuse = nn.Conv2d(len(in_channels) * hidden_size, hidden_size, kernel_size=1)
        self.batch_norm = nn.BatchNorm2d(hidden_size, eps=batch_norm_eps)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(hidden_size, num_outputs, kernel_size=1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[-2:]
        projected = []
        for feature, linear in zip(features, self.linear_c):
            x = linear(feature.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            if x.shape[-2:] != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            projected.append(x)
        x = F.relu(self.batch_norm(self.linear_fuse(torch.cat(projected[::-1], dim=1))))
        return self.classifier(self.dropout(x))


def weighted_statistics_pooling(x: torch.Tensor, log_weights: torch.Tensor | None = None) -> torch.Tensor:
    """TruFor's weighted statistics pooling of ``x`` ``(B, C, H, W)`` -> ``(B, 4 C)`` in float32:
    soft-min ``-logsumexp(log w - x)``, soft-max ``logsumexp(log w + x)``, weighted mean and weighted
    mean square, the weights ``w = softmax(log_weights)`` over the pixels (uniform when omitted)."""
    x = x.flatten(2).float()
    if log_weights is None:
        log_w = torch.full_like(x[:, :1], -math.log(x.shape[-1]))
    else:
        log_w = F.log_softmax(log_weights.flatten(2).float(), dim=-1)
    soft_min = -torch.logsumexp(log_w - x, dim=-1)
    soft_max = torch.logsumexp(log_w + x, dim=-1)
    w = log_w.exp()
    mean = (w * x).sum(-1)
    mean_square = (w * x * x).sum(-1)
    return torch.cat((soft_min, soft_max, mean, mean_square), dim=1)


# ----------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------


def weighted_pixel_bce(logits: torch.Tensor, target: torch.Tensor, class_weights: tuple[float, float]) -> torch.Tensor:
    """The 2-class weighted cross-entropy of the original on one logit: per-pixel BCE weighted by
    ``class_weights[target]`` and normalised by the sum of the weights (`nn.CrossEntropyLoss(weight=)`)."""
    weights = torch.where(target > 0.5, class_weights[1], class_weights[0])
    losses = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    return (weights * losses).sum() / weights.sum()


def squared_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """The original Dice (exponent 2): ``1 - mean_b (2 sum(p t) + s) / (sum(p^2) + sum(t^2) + max(s, 1e-5))``."""
    probability = torch.sigmoid(logits.float()).flatten(1)
    target = target.flatten(1)
    numerator = 2 * (probability * target).sum(1) + smooth
    denominator = probability.square().sum(1) + target.square().sum(1) + max(smooth, 1e-5)
    return 1 - (numerator / denominator).mean()


def confidence_targets(masks: torch.Tensor, erode_size: int = 15, dilate_size: int = 11) -> tuple[torch.Tensor, ...]:
    """``(authentic, manipulated)`` pixel targets of the confidence loss: outside ``dilate(mask)`` and
    inside ``erode(mask)`` (max-pooling); the band in between is ignored."""
    manipulated = 1 - F.max_pool2d(1 - masks, erode_size, stride=1, padding=erode_size // 2)
    authentic = 1 - F.max_pool2d(masks, dilate_size, stride=1, padding=dilate_size // 2)
    return authentic, manipulated


def confidence_loss(
    confidence_logits: torch.Tensor, anomaly_logits: torch.Tensor, masks: torch.Tensor, erode: int, dilate: int
) -> torch.Tensor:
    """MSE between ``sigmoid(confidence)`` and the true-class probability of the anomaly map
    (``p`` on manipulated pixels, ``1 - p`` on authentic ones), on the pixels away from the mask border.
    The true-class probability is a target: no gradient flows into the anomaly map through it."""
    authentic, manipulated = confidence_targets(masks, erode, dilate)
    probability = torch.sigmoid(anomaly_logits.detach().float())
    true_class = probability * manipulated + (1 - probability) * authentic
    valid = ((manipulated > 0) | (authentic > 0)).float()
    error = (torch.sigmoid(confidence_logits.float()) - true_class).square()
    return (error * valid).sum() / valid.sum().clamp_min(1.0)


def weighted_detection_bce(
    logits: torch.Tensor, target: torch.Tensor, class_weights: tuple[float, float]
) -> torch.Tensor:
    """Detection BCE with per-sample weights ``class_weights[target]`` (mean over the batch)."""
    weights = target * class_weights[1] + (1 - target) * class_weights[0]
    return F.binary_cross_entropy_with_logits(logits.float(), target, weight=weights)


# ----------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------


class TruForForForgeryDetection(M3DDetectorPreTrainedModel):
    """TruFor (Guillaro et al., "TruFor: Leveraging all-round clues for trustworthy image forgery
    detection and localization", CVPR 2023; code grip-unina/TruFor).

    Key components:
    - **Noiseprint++** (`TruForNoiseprint`): a 17-layer DnCNN (3x3, 64 channels, BatchNorm on layers
      2-16, no residual) on the [0, 1] image; its 1-channel noiseprint is tiled to 3 channels. Frozen by
      default (``freeze_noiseprint``: ``requires_grad=False``, always in eval mode).
    - **CMX encoder** (`TruForDualEncoder`): two MiT-B2 streams (transformers' `SegformerLayer` blocks;
      embed 64/128/320/512, heads 1/2/5/8, depths 3/4/6/3, key/value reduction 8/4/2/1) on the
      ImageNet-normalised RGB image and on the noiseprint. After every stage a Feature Rectify Module
      (channel + spatial cross-weights, each stream += 0.5 cw * other + 0.5 sw * other) and a Feature
      Fusion Module (channel-context cross-attention, residual + LayerNorm, channel embedding 2C -> C)
      give one fused map per stage (1/4 ... 1/32).
    - **Anomaly decoder** and **confidence decoder**: two SegFormer all-MLP decoders (width 512) ->
      bilinear upsampling to the input size. The original anomaly decoder has 2 classes
      (authentic/manipulated, softmax); here it has the single logit ``l_1 - l_0`` (the same
      probability, ``softmax(l)_1 = sigmoid(l_1 - l_0)``) = ``localization_logits``.
    - **Detection head**: weighted statistics pooling (soft-min, soft-max, mean, mean square) of the
      confidence logits (uniform weights) and of the anomaly logits weighted by ``logsigmoid(confidence)``
      -> 8 features -> Linear 8 -> 128 -> ReLU -> Dropout 0.5 -> Linear -> 1 = ``logits``.
    - **Losses** (``config.training_phase``): ``"localization"`` (phase 2): ``0.3`` weighted CE (class
      weights 0.5 / 2.5) ``+ 0.7`` Dice (exponent 2) on the anomaly map; ``"detection"`` (phase 3,
      encoder and anomaly decoder frozen): MSE(sigmoid(confidence), true-class probability of the anomaly
      map) away from the mask borders ``+ 0.5`` weighted BCE (0.5/0.3, 0.5/0.7) on the detection logit;
      ``"joint"`` (default): the sum. The detection target is ``labels``, or ``mask has > 3 pixels``
      when only ``masks`` are given (as the original).

    Outputs: ``logits`` ``(B,)`` detection logit; ``localization_logits`` ``(B, 1, H, W)`` anomaly logit;
    ``confidence`` ``(B, 1, H, W)`` confidence **probability** (sigmoid already applied, as the
    original's inference output; the losses use the logits internally).

    Input: ``(B, 3, H, W)`` in [-1, 1] with H and W multiples of 32; mapped to [0, 1] for Noiseprint++
    and ImageNet-normalised for the RGB stream (``rgb_preprocessing``).
    `convert_original_trufor_state_dict` maps a released TruFor checkpoint onto this model.

    Default config: 68,696,908 parameters (Noiseprint++ 557,249; each MiT-B2 stream 24,196,288; FRMs
    10,019,848; FFMs 6,572,032; each decoder 1,576,961; detection head 1,281). Original: 68,697,421
    (counted on the released architecture: the same modules with a 2-class anomaly classifier, +513;
    REFERENCES: ~68.7 M).
    """

    config_class = TruForConfig
    base_model_prefix = "trufor"
    localizes = True
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["TruForMiTStage"]

    def __init__(self, config: TruForConfig) -> None:
        super().__init__(config)
        self.noiseprint = TruForNoiseprint(
            in_channels=config.num_channels,
            num_layers=config.noiseprint_num_layers,
            channels=config.noiseprint_channels,
            kernel_size=config.noiseprint_kernel_size,
            out_channels=config.noiseprint_out_channels,
            bn_momentum=config.noiseprint_bn_momentum,
            frozen=config.freeze_noiseprint,
        )
        self.rgb_normalization = TruForRGBNormalization(config.rgb_preprocessing)
        self.encoder = TruForDualEncoder(config)
        decoder_args = (config.decoder_hidden_size, config.decoder_dropout, config.decoder_batch_norm_eps)
        self.anomaly_decoder = TruForMLPDecoder(config.hidden_sizes, 1, *decoder_args)
        self.confidence_decoder = TruForMLPDecoder(config.hidden_sizes, 1, *decoder_args)
        self.detection_head = nn.Sequential(
            nn.Linear(8, config.detection_hidden_size),
            nn.ReLU(),
            nn.Dropout(config.detection_dropout),
            nn.Linear(config.detection_hidden_size, 1),
        )
        self.post_init()
        self.set_training_phase(config.training_phase)

    # -- weights, freezing ---------------------------------------------------------------------------

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, TruForRGBNormalization):
            module.reset_statistics()  # fixed values, also after meta-device loading
        elif isinstance(module, nn.Conv2d) and module.groups > 1:
            # the original MiT/CMX init: normal(0, sqrt(2 / fan_out)) with fan_out = k*k*out / groups
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
            nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))

    def frozen_modules(self) -> list[nn.Module]:
        """The submodules the current config freezes: Noiseprint++ (``freeze_noiseprint``), and in the
        ``"detection"`` phase the encoder and the anomaly decoder."""
        frozen: list[nn.Module] = [self.noiseprint] if self.config.freeze_noiseprint else []
        if self.config.training_phase == "detection":
            frozen += [self.encoder, self.anomaly_decoder]
        return frozen

    def set_training_phase(self, phase: str) -> None:
        """Switch the loss and the frozen parts: ``"localization"``, ``"detection"`` or ``"joint"``.

        Every parameter outside `frozen_modules` becomes trainable again; frozen modules get
        ``requires_grad=False`` and stay in eval mode inside ``model.train()``."""
        if phase not in TRAINING_PHASES:
            raise ValueError(f"training_phase must be one of {TRAINING_PHASES}; got {phase!r}")
        self.config.training_phase = phase
        frozen = self.frozen_modules()
        frozen_ids = {id(p) for module in frozen for p in module.parameters()}
        for parameter in self.parameters():
            parameter.requires_grad_(id(parameter) not in frozen_ids)
        self.noiseprint.frozen = self.config.freeze_noiseprint
        self.train(self.training)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, then the config's freezing is re-applied (loading replaces
        the parameters by fresh ``requires_grad=True`` ones)."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.set_training_phase(model.config.training_phase)
        return loaded

    def train(self, mode: bool = True) -> "TruForForForgeryDetection":
        super().train(mode)
        if mode:
            for module in self.frozen_modules():
                module.eval()
        return self

    # -- forward -------------------------------------------------------------------------------------

    def compute_loss(
        self,
        logits: torch.Tensor,
        anomaly_logits: torch.Tensor,
        confidence_logits: torch.Tensor,
        labels: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """TruFor's loss for ``config.training_phase`` (see the class docstring); None when the inputs
        given do not define any term of that phase (e.g. only ``labels`` in ``"localization"``)."""
        config = self.config
        phase = config.training_phase
        if masks is not None:
            masks = (masks.float().view_as(anomaly_logits) > 0.5).float()
        terms = []
        if phase in ("localization", "joint") and masks is not None:
            localization = config.localization_ce_weight * weighted_pixel_bce(
                anomaly_logits, masks, config.class_weights
            ) + config.localization_dice_weight * squared_dice_loss(anomaly_logits, masks, config.dice_smooth)
            terms.append(config.localization_loss_weight * localization)
        if phase in ("detection", "joint") and (labels is not None or masks is not None):
            if labels is not None:
                target = labels.float().view_as(logits)
            else:
                target = (masks.flatten(1).sum(1) > 3).float()
            detection = config.detection_bce_weight * weighted_detection_bce(
                logits, target, config.detection_class_weights
            )
            if masks is not None:
                detection = detection + config.confidence_loss_weight * confidence_loss(
                    confidence_logits,
                    anomaly_logits,
                    masks,
                    config.confidence_erode_size,
                    config.confidence_dilate_size,
                )
            terms.append(config.detection_loss_weight * detection)
        return torch.stack(terms).sum() if terms else None

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DetectorOutput | tuple:
        self.check_pixel_values(pixel_values)
        height, width = pixel_values.shape[-2:]
        multiple = self.config.input_multiple
        if height % multiple or width % multiple:
            raise ValueError(f"TruFor needs H and W multiples of {multiple}; got {height}x{width}")
        images01 = (pixel_values + 1) * 0.5
        noise = self.noiseprint(images01)
        features = self.encoder(self.rgb_normalization(images01), noise)
        size = (height, width)
        anomaly_logits = F.interpolate(self.anomaly_decoder(features), size=size, mode="bilinear", align_corners=False)
        confidence_logits = F.interpolate(
            self.confidence_decoder(features), size=size, mode="bilinear", align_corners=False
        )
        pooled = torch.cat(
            (
                weighted_statistics_pooling(confidence_logits),
                weighted_statistics_pooling(anomaly_logits, F.logsigmoid(confidence_logits.float())),
            ),
            dim=1,
        )
        logits = self.detection_head(pooled.to(confidence_logits.dtype)).squeeze(-1)
        loss = None
        if labels is not None or masks is not None:
            loss = self.compute_loss(logits, anomaly_logits, confidence_logits, labels, masks)
        confidence = torch.sigmoid(confidence_logits)
        if not return_dict:
            outputs = (logits, anomaly_logits, confidence)
            return ((loss,) + outputs) if loss is not None else outputs
        return DetectorOutput(loss=loss, logits=logits, localization_logits=anomaly_logits, confidence=confidence)


# ----------------------------------------------------------------------------------------------------
# Conversion of the released checkpoints
# ----------------------------------------------------------------------------------------------------

_ORIGINAL_BLOCK_RENAMES = (
    ("norm1", "layernorm_before"),
    ("norm2", "layernorm_after"),
    ("attn.q", "attention.q_proj"),
    ("attn.proj", "attention.o_proj"),
    ("attn.sr", "attention.sequence_reduction.sequence_reduction"),
    ("attn.norm", "attention.sequence_reduction.layer_norm"),
    ("mlp.fc1", "mlp.fc1"),
    ("mlp.dwconv.dwconv", "mlp.dwconv.dwconv"),
    ("mlp.fc2", "mlp.fc2"),
)


def _convert_key(key: str) -> str | None:
    """The name in this model of one original parameter (``attn.kv`` is split by the caller)."""
    if key.startswith("dncnn."):
        return "noiseprint." + key[len("dncnn.") :]
    if key.startswith("detection."):
        return "detection_head." + key[len("detection.") :]
    match = re.match(r"decode_head(_conf)?\.(.+)$", key)
    if match:
        decoder = "confidence_decoder" if match.group(1) else "anomaly_decoder"
        rest = match.group(2)
        rest = re.sub(r"^linear_c(\d)\.proj\.", lambda m: f"linear_c.{int(m.group(1)) - 1}.", rest)
        rest = rest.replace("linear_fuse.0.", "linear_fuse.").replace("linear_fuse.1.", "batch_norm.")
        rest = rest.replace("linear_pred.", "classifier.")
        return f"{decoder}.{rest}"
    if not key.startswith("backbone."):
        return None
    key = key[len("backbone.") :]
    match = re.match(r"(FRMs|FFMs)\.(\d)\.(.+)$", key)
    if match:
        return f"encoder.{match.group(1).lower()}.{match.group(2)}.{match.group(3)}"
    match = re.match(r"(extra_)?(patch_embed|block|norm)(\d)\.(.+)$", key)
    if not match:
        return None
    stream = "noise_stages" if match.group(1) else "rgb_stages"
    kind, stage, rest = match.group(2), int(match.group(3)) - 1, match.group(4)
    prefix = f"encoder.{stream}.{stage}"
    if kind == "patch_embed":
        return f"{prefix}.patch_embeddings.{rest.replace('norm.', 'layer_norm.')}"
    if kind == "norm":
        return f"{prefix}.layer_norm.{rest}"
    index, rest = rest.split(".", 1)
    for old, new in _ORIGINAL_BLOCK_RENAMES:
        if rest.startswith(old + "."):
            return f"{prefix}.blocks.{index}.{new}{rest[len(old) :]}"
    return None


def convert_original_trufor_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a released TruFor state dict (``torch.load(...)['network']`` of grip-unina/TruFor, loaded
    by the caller) onto `TruForForForgeryDetection`'s parameter names.

    The MiT ``attn.kv`` projections are split into ``k_proj`` / ``v_proj``; the 2-class anomaly
    classifier becomes the single logit ``l_1 - l_0`` (weights and bias differences), which gives the
    same manipulated-class probability and the same detection input. Raises ``ValueError`` on a key
    it does not know."""
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        kv = re.match(r"(.*)\.attn\.kv\.(weight|bias)$", key)
        if kv:
            base = _convert_key(f"{kv.group(1)}.attn.q.{kv.group(2)}")
            if base is None:
                raise ValueError(f"unknown TruFor parameter {key!r}")
            key_part, value_part = value.chunk(2, dim=0)
            converted[base.replace("q_proj", "k_proj")] = key_part.clone()
            converted[base.replace("q_proj", "v_proj")] = value_part.clone()
            continue
        new_key = _convert_key(key)
        if new_key is None:
            raise ValueError(f"unknown TruFor parameter {key!r}")
        if new_key.startswith("anomaly_decoder.classifier.") and value.shape[0] == 2:
            value = value[1:2] - value[0:1]
        converted[new_key] = value
    return converted
