"""3-D CycleGAN: `CycleGAN3DGenerator` (ResNet generator) and `CycleGAN3DDiscriminator` (PatchGAN).

The generator is the CycleGAN ResNet generator (Zhu et al. 2017, "c7s1-64, d128, d256, R256 x n,
u128, u64, c7s1-3") made volumetric: ``ReflectionPad3d(3)`` + ``Conv3d(7^3)`` -> InstanceNorm ->
ReLU; ``n_downsampling`` (2) ``Conv3d(3^3, stride 2)`` -> InstanceNorm -> ReLU doubling the width;
``n_blocks`` residual blocks (reflection pad, conv 3^3, InstanceNorm, ReLU, [dropout], reflection
pad, conv 3^3, InstanceNorm, + input; the dropout can also run at inference, seeded, as pix2pix's
noise); ``n_downsampling`` x (trilinear upsample x2, pad 1, ``Conv3d(3^3)``) -> InstanceNorm -> ReLU;
``ReflectionPad3d(3)`` + ``Conv3d(7^3)`` -> tanh.

Upsampling is resize + convolution rather than CycleGAN's ``ConvTranspose3d(3^3, stride 2)``: a strided
transposed convolution whose kernel is not divisible by its stride covers the output unevenly, which
prints a period-2 grid on every generated cube (Odena, Dumoulin & Olah 2016, "Deconvolution and
Checkerboard Artifacts"; the first demo CycleGAN showed it, seam 2.7 vs 1.02 pristine). InstanceNorm3d
has no affine parameters and no running statistics (CycleGAN's default), and convolutions keep their
biases.

``skip_connections=True`` (not CycleGAN's; the demo injector's recipe) adds the encoder's features at 32^3 and
16^3 to the decoder's output at the same size, which costs no weights. Without them, this narrow generator draws
the whole hole from its 8^3 residual features: the demo injector trained so left a period-4 lattice along x in
every cube (spectral peak 19, pristine 3.8); with them, trained alike, its peak is 4-5 at every checkpoint. An
anti-aliased (blurred) stride-2 stage on top did not help (peak 22 after 900 steps).

For a 32^3 cube the residual blocks run at 8^3; ``n_blocks=6`` is CycleGAN's choice for small
(128 px) images and the default here. ``ngf`` defaults to 32 instead of CycleGAN's 64 so that the demo
runs on a CPU.

M3Dsynth trains two generators, G: masked cube -> filled cube and F: filled cube -> masked cube, with
two discriminators and the cycle losses; only G (masked -> tissue) is used at inference, and only G
is a component of `CycleGAN3DPipeline`. The discriminator is CT-GAN's PatchGAN
(`PatchDiscriminator3D`) with CycleGAN's settings: unconditional (1 channel), InstanceNorm, norm
before the activation. Keep the module path stable: saved pipelines record
``["m3d.models.cyclegan3d", "CycleGAN3DGenerator"]``.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from ..presets import PresetMixin

from .pix2pix3d import GeneratorOutput, PatchDiscriminator3D, seeded_dropout

__all__ = ["CycleGAN3DGenerator", "CycleGAN3DDiscriminator"]

PADDING_MODES = ("reflect", "replicate", "zeros")


def _pad(mode: str, size: int) -> nn.Module:
    if mode == "reflect":
        return nn.ReflectionPad3d(size)
    if mode == "replicate":
        return nn.ReplicationPad3d(size)
    if mode == "zeros":
        return nn.ConstantPad3d(size, 0.0)
    raise ValueError(f"padding_mode must be one of {PADDING_MODES}; got {mode!r}")


def _instance_norm(channels: int) -> nn.Module:
    return nn.InstanceNorm3d(channels, affine=False, track_running_stats=False)


class ResnetBlock3D(nn.Module):
    """CycleGAN's residual block: pad, conv, norm, ReLU, [dropout], pad, conv, norm, + input. The dropout is applied
    between ``block[:4]`` and ``block[4:]`` rather than held as a layer, so that a network with dropout has the same
    weight names as one without (a trained network can be fine-tuned with it)."""

    def __init__(self, channels: int, padding_mode: str, dropout: float):
        super().__init__()
        self.dropout = dropout
        self.block = nn.Sequential(
            _pad(padding_mode, 1),
            nn.Conv3d(channels, channels, 3),
            _instance_norm(channels),
            nn.ReLU(),
            _pad(padding_mode, 1),
            nn.Conv3d(channels, channels, 3),
            _instance_norm(channels),
        )

    def forward(
        self, x: torch.Tensor, dropout_generator: torch.Generator | list[torch.Generator] | None = None
    ) -> torch.Tensor:
        h = seeded_dropout(self.block[:4](x), self.dropout, self.training, dropout_generator)
        return x + self.block[4:](h)


class CycleGAN3DGenerator(PresetMixin, ModelMixin, ConfigMixin):
    """3-D CycleGAN ResNet generator (see module doc).

    Args:
        in_channels: 1 (masked cube), 2 (+ hole mask) or 3 (+ the mask of the nodule to draw,
            `m3d.tamper.nodule_shape`) for G; 1 for the reverse generator F.
        out_channels: 1.
        ngf: filters of the first layer (CycleGAN: 64; default 32 for CPU demos).
        n_blocks: residual blocks at the lowest resolution (default 6).
        n_downsampling: stride-2 stages (2: 32^3 -> 8^3).
        dropout: dropout inside residual blocks (CycleGAN's default: none; its option: 0.5), active in training mode
            only unless a ``dropout_generator`` is given to ``forward``.
        padding_mode: ``"reflect"`` (CycleGAN), ``"replicate"`` or ``"zeros"``.
        skip_connections: add the encoder's features at each resolution to the decoder's output at that
            resolution (off in CycleGAN; see the module doc).
    """

    _supports_gradient_checkpointing = True

    # "reference": CycleGAN's ngf = 64 with 6 residual blocks
    presets = {
        "reference": dict(ngf=64, n_blocks=6),
        "default": {},
        "demo": dict(ngf=8, n_blocks=3),
        "tiny": dict(ngf=4, n_blocks=2),
    }

    @register_to_config
    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        ngf: int = 32,
        n_blocks: int = 6,
        n_downsampling: int = 2,
        dropout: float = 0.0,
        padding_mode: str = "reflect",
        skip_connections: bool = False,
    ):
        super().__init__()
        stem: list[nn.Module] = [_pad(padding_mode, 3), nn.Conv3d(in_channels, ngf, 7), _instance_norm(ngf), nn.ReLU()]
        width = ngf
        self._stage_starts = []  # encoder indices where a downsampling stage begins (its input feeds a skip)
        for _ in range(n_downsampling):
            self._stage_starts.append(len(stem))
            stem += [nn.Conv3d(width, 2 * width, 3, stride=2, padding=1), _instance_norm(2 * width), nn.ReLU()]
            width *= 2
        self.encoder = nn.Sequential(*stem)
        self.blocks = nn.ModuleList(ResnetBlock3D(width, padding_mode, dropout) for _ in range(n_blocks))
        head: list[nn.Module] = []
        for _ in range(n_downsampling):
            head += [
                nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
                _pad(padding_mode, 1),
                nn.Conv3d(width, width // 2, 3),
                _instance_norm(width // 2),
                nn.ReLU(),
            ]
            width //= 2
        head += [_pad(padding_mode, 3), nn.Conv3d(width, out_channels, 7), nn.Tanh()]
        self.decoder = nn.Sequential(*head)
        self.gradient_checkpointing = False

    def forward(
        self,
        sample: torch.Tensor,
        dropout_generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> GeneratorOutput | tuple[torch.Tensor]:
        """Translate ``sample`` ``(B, in_channels, D, H, W)`` (sizes divisible by ``2 ** n_downsampling``).

        ``dropout_generator`` turns on the residual blocks' dropout in eval mode, seeded (pix2pix's test-time noise).
        """
        if sample.ndim != 5:
            raise ValueError(f"sample must be (B, C, D, H, W); got shape {tuple(sample.shape)}")
        factor = 2**self.config.n_downsampling
        if any(n % factor for n in sample.shape[2:]):
            raise ValueError(f"spatial size {tuple(sample.shape[2:])} must be divisible by {factor}")
        skips, h = [], sample
        for index, layer in enumerate(self.encoder):
            if self.config.skip_connections and index in self._stage_starts:
                skips.append(h)
            h = layer(h)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = self._gradient_checkpointing_func(block, h, dropout_generator)
            else:
                h = block(h, dropout_generator)
        for layer in self.decoder:
            h = layer(h)
            if skips and isinstance(layer, nn.ReLU):  # the end of an upsampling stage
                h = h + skips.pop()
        out = h
        if not return_dict:
            return (out,)
        return GeneratorOutput(sample=out)


class CycleGAN3DDiscriminator(PatchDiscriminator3D):
    """`PatchDiscriminator3D` with CycleGAN's defaults: unconditional, InstanceNorm, norm then
    LeakyReLU. One per domain in training (D_filled for G's outputs, D_masked for F's)."""

    presets = {"reference": dict(df=64), "default": {}, "demo": dict(df=8), "tiny": dict(df=4)}

    @register_to_config
    def __init__(
        self,
        in_channels: int = 1,
        df: int = 32,
        n_layers: int = 4,
        norm_type: str = "instance",
        activation_before_norm: bool = False,
        sample_size: int = 32,
    ):
        super().__init__(
            in_channels=in_channels,
            df=df,
            n_layers=n_layers,
            norm_type=norm_type,
            activation_before_norm=activation_before_norm,
            sample_size=sample_size,
        )
