"""`UNet3DModel`: the volumetric DDPM denoiser of the M3Dsynth diffusion generator.

A 3-D U-Net in the style of Med-DDPM / MONAI's ``DiffusionModelUNet`` (spatial_dims=3), written for
diffusers: sinusoidal timestep embedding + MLP; per resolution level ``layers_per_block`` residual
blocks (GroupNorm -> SiLU -> conv3d, the time embedding added between the two convolutions) with
optional multi-head self-attention (``torch.nn.functional.scaled_dot_product_attention``) after each
block; a strided-conv downsampler between levels; a middle block (res, attention, res); a mirrored
decoder that concatenates the encoder's skip activations and upsamples with nearest + conv; and a
zero-initialised output convolution (so an untrained model predicts zero noise).

For inpainting the input is ``concat(noisy cube, masked cube, hole mask)`` (``in_channels=3``) and the
output is the predicted noise of the first channel (``out_channels=1``). Works in bf16/fp16 and with
``torch.channels_last_3d`` (convert both the model and the input); gradient checkpointing is supported
through diffusers' ``enable_gradient_checkpointing()``.

diffusers has no volumetric U-Net (``UNet3DConditionModel`` is a video model with 2-D convolutions
and temporal layers), hence this file. Keep its module path stable: saved pipelines record
``["m3d.models.unet3d", "UNet3DModel"]`` in ``model_index.json``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from torch import nn

from ..presets import PresetMixin

__all__ = ["UNet3DModel", "UNet3DOutput", "timestep_embedding"]


@dataclass
class UNet3DOutput(BaseOutput):
    """Output of `UNet3DModel`: ``sample`` ``(B, out_channels, D, H, W)``, the predicted noise."""

    sample: torch.Tensor


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``(B, dim)`` (cos then sin) of a ``(B,)`` tensor of timesteps, in float32."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    args = timesteps.float()[:, None] * torch.exp(exponent)[None, :]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


def _zero(module: nn.Module) -> nn.Module:
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class ResBlock3D(nn.Module):
    """GroupNorm -> SiLU -> conv3d, + projected time embedding, GroupNorm -> SiLU -> dropout -> conv3d
    (zero-initialised), plus a 1x1x1 shortcut when the channel count changes."""

    def __init__(
        self, in_channels: int, out_channels: int, temb_channels: int, groups: int, eps: float, dropout: float
    ):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv3d(out_channels, out_channels, 3, padding=1))
        self.shortcut = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class SelfAttention3D(nn.Module):
    """Multi-head self-attention over all voxels of a feature map (used at low resolution only)."""

    def __init__(self, channels: int, num_head_channels: int, groups: int, eps: float):
        super().__init__()
        self.num_heads = max(1, channels // num_head_channels)
        if channels % self.num_heads:
            raise ValueError(f"{channels} channels cannot be split into {self.num_heads} heads")
        self.norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_qkv = nn.Linear(channels, 3 * channels)
        self.proj_out = _zero(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        tokens = self.norm(x).reshape(b, c, d * h * w).transpose(1, 2)  # (B, N, C)
        qkv = self.to_qkv(tokens).reshape(b, d * h * w, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        out = self.proj_out(out.transpose(1, 2).reshape(b, d * h * w, c))
        return x + out.transpose(1, 2).reshape(b, c, d, h, w)


class Downsample3D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample3D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: residual blocks (each optionally followed by attention) + resampler."""

    def __init__(self, resnets: list[ResBlock3D], attentions: list[nn.Module], sampler: nn.Module | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)
        self.sampler = sampler
        self.gradient_checkpointing = False

    def run_block(self, index: int, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            h = self._gradient_checkpointing_func(self.resnets[index], h, temb)
        else:
            h = self.resnets[index](h, temb)
        return self.attentions[index](h)


class UNet3DModel(PresetMixin, ModelMixin, ConfigMixin):
    """Volumetric DDPM denoiser (see module doc).

    Presets (`from_preset`): "reference" (a Med-DDPM-like U-Net), "default" (the class defaults), "demo"
    (the shipped demo pipelines' size, which trains on a 2-core CPU), "tiny" (unit tests).

    Args:
        in_channels: input channels; 3 for inpainting = noisy cube, masked cube, hole mask.
        out_channels: predicted channels (1: the noise of the cube).
        block_out_channels: channels per resolution level; the reference is ``(64, 128, 256)``
            (32^3 -> 16^3 -> 8^3), tests use ``(8, 16)``.
        layers_per_block: residual blocks per level in the encoder (the decoder has one more).
        attention_levels: per level, whether each residual block is followed by self-attention;
            the reference attends at the lowest resolution only (8^3 = 512 tokens).
        mid_block_attention: self-attention between the two residual blocks of the middle block.
        norm_num_groups: GroupNorm groups (must divide every entry of ``block_out_channels``).
        num_head_channels: channels per attention head.
        dropout: dropout inside residual blocks.
        norm_eps: GroupNorm epsilon.
    """

    _supports_gradient_checkpointing = True

    presets = {
        "reference": dict(
            block_out_channels=(64, 128, 256),
            layers_per_block=2,
            attention_levels=(False, False, True),
            norm_num_groups=32,
            num_head_channels=32,
        ),
        "default": {},
        "demo": dict(
            block_out_channels=(16, 32, 64),
            layers_per_block=1,
            attention_levels=(False, False, True),
            norm_num_groups=8,
            num_head_channels=16,
        ),
        "tiny": dict(
            block_out_channels=(8, 16),
            layers_per_block=1,
            attention_levels=(False, True),
            norm_num_groups=4,
            num_head_channels=8,
        ),
    }

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        block_out_channels: Sequence[int] = (64, 128, 256),
        layers_per_block: int = 2,
        attention_levels: Sequence[bool] = (False, False, True),
        mid_block_attention: bool = True,
        norm_num_groups: int = 32,
        num_head_channels: int = 32,
        dropout: float = 0.0,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        channels = list(block_out_channels)
        if len(attention_levels) != len(channels):
            raise ValueError(
                f"attention_levels has {len(attention_levels)} entries for {len(channels)} levels in "
                "block_out_channels"
            )
        if any(c % norm_num_groups for c in channels):
            raise ValueError(
                f"norm_num_groups={norm_num_groups} must divide every block_out_channels entry {channels}"
            )
        groups, eps = norm_num_groups, norm_eps
        temb_channels = 4 * channels[0]

        self.time_embedding = nn.Sequential(
            nn.Linear(channels[0], temb_channels), nn.SiLU(), nn.Linear(temb_channels, temb_channels)
        )
        self.conv_in = nn.Conv3d(in_channels, channels[0], 3, padding=1)

        def attention(c: int, enabled: bool) -> nn.Module:
            return SelfAttention3D(c, num_head_channels, groups, eps) if enabled else nn.Identity()

        skip_channels = [channels[0]]
        self.down_blocks = nn.ModuleList()
        previous = channels[0]
        for level, (c, attend) in enumerate(zip(channels, attention_levels)):
            last = level == len(channels) - 1
            resnets, attentions = [], []
            for _ in range(layers_per_block):
                resnets.append(ResBlock3D(previous, c, temb_channels, groups, eps, dropout))
                attentions.append(attention(c, attend))
                skip_channels.append(c)
                previous = c
            self.down_blocks.append(_Level(resnets, attentions, None if last else Downsample3D(c)))
            if not last:
                skip_channels.append(c)

        self.mid_block = _Level(
            [
                ResBlock3D(previous, previous, temb_channels, groups, eps, dropout),
                ResBlock3D(previous, previous, temb_channels, groups, eps, dropout),
            ],
            [attention(previous, mid_block_attention), nn.Identity()],
            None,
        )

        self.up_blocks = nn.ModuleList()
        for level in reversed(range(len(channels))):
            c = channels[level]
            resnets, attentions = [], []
            for _ in range(layers_per_block + 1):
                resnets.append(ResBlock3D(previous + skip_channels.pop(), c, temb_channels, groups, eps, dropout))
                attentions.append(attention(c, attention_levels[level]))
                previous = c
            self.up_blocks.append(_Level(resnets, attentions, Upsample3D(c) if level > 0 else None))

        self.norm_out = nn.GroupNorm(groups, channels[0], eps=eps)
        self.conv_out = _zero(nn.Conv3d(channels[0], out_channels, 3, padding=1))

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        return_dict: bool = True,
    ) -> UNet3DOutput | tuple[torch.Tensor]:
        """Predict the noise of ``sample`` ``(B, in_channels, D, H, W)`` at ``timestep`` (a number or a
        ``(B,)`` tensor); D, H, W must be divisible by ``2 ** (levels - 1)``."""
        if sample.ndim != 5:
            raise ValueError(f"sample must be (B, C, D, H, W); got shape {tuple(sample.shape)}")
        factor = self.downsampling_factor
        if any(n % factor for n in sample.shape[2:]):
            raise ValueError(f"spatial size {tuple(sample.shape[2:])} must be divisible by {factor}")
        batch = sample.shape[0]
        timesteps = torch.as_tensor(timestep, device=sample.device)
        if timesteps.ndim == 0:
            timesteps = timesteps[None]
        timesteps = timesteps.expand(batch) if timesteps.numel() == 1 else timesteps
        if timesteps.shape != (batch,):
            raise ValueError(f"timestep must be a scalar or a ({batch},) tensor; got shape {tuple(timesteps.shape)}")
        if batch == 1 and sample.device.type == "cpu" and not torch.is_grad_enabled():
            # PyTorch runs CPU 3-D convolutions of a batch of one on its slow reference path (about 10x
            # slower than oneDNN, which it picks from two samples on): sampling one cube, run two.
            out = self.forward(sample.expand(2, *sample.shape[1:]), timesteps.expand(2), return_dict=False)[0][:1]
            return (out,) if not return_dict else UNet3DOutput(sample=out)
        embedding = timestep_embedding(timesteps, self.config.block_out_channels[0])
        temb = self.time_embedding(embedding.to(self.time_embedding[0].weight.dtype))

        h = self.conv_in(sample)
        skips = [h]
        for block in self.down_blocks:
            for index in range(len(block.resnets)):
                h = block.run_block(index, h, temb)
                skips.append(h)
            if block.sampler is not None:
                h = block.sampler(h)
                skips.append(h)

        for index in range(len(self.mid_block.resnets)):
            h = self.mid_block.run_block(index, h, temb)

        for block in self.up_blocks:
            for index in range(len(block.resnets)):
                h = block.run_block(index, torch.cat([h, skips.pop()], dim=1), temb)
            if block.sampler is not None:
                h = block.sampler(h)

        out = self.conv_out(F.silu(self.norm_out(h)))
        if not return_dict:
            return (out,)
        return UNet3DOutput(sample=out)
