"""CT-GAN's 3-D pix2pix: `Pix2Pix3DGenerator` (U-Net) and `PatchDiscriminator3D` (PatchGAN).

Architecture as in CT-GAN (Mirsky et al., USENIX Security 2019; ``procedures/trainer.py``), which
M3Dsynth uses as its "pix2pix" generator:

* Generator, input the masked 32^3 cube: ``depth`` (5) encoder layers ``Conv3d(4^3, stride 2)`` ->
  ``LeakyReLU(0.2)`` -> norm (none on the first), widths ``gf * (1, 2, 4, 8, 8)``, 32^3 -> 1^3;
  ``depth - 1`` decoder layers ``nearest upsample x2`` -> ``Conv3d(4^3, 'same')`` -> ReLU -> dropout
  (0.5, every decoder layer, as CT-GAN) -> norm -> concat with the encoder skip; a final upsample ->
  ``Conv3d(4^3, 'same')`` -> tanh. ``upsample_mode="trilinear"`` resizes by trilinear interpolation
  instead: nearest-neighbour copies before a 4^3 convolution print a period-2 texture on the generated
  tissue (Odena, Dumoulin & Olah 2016; the first demo Pix2Pix's injections showed a spectral peak 13x
  the pristine lung's). The default stays CT-GAN's. The layer order (activation before normalisation) and the Keras
  BatchNorm settings (momentum 0.8 -> PyTorch ``momentum=0.2``, ``eps=1e-3``) follow CT-GAN.
* Discriminator: conditional PatchGAN on ``concat(candidate, condition)`` (CT-GAN's order:
  ``[img_A, img_B]`` = the complete cube, then the masked one); ``n_layers`` (4) layers
  ``Conv3d(4^3, stride 2)`` -> LeakyReLU(0.2) -> norm (none on the first), widths ``df * (1, 2, 4, 8)``,
  then ``Conv3d(4^3, 'same')`` to one channel: a 2^3 patch map for a 32^3 cube. No sigmoid
  (CT-GAN trains it with an MSE / LSGAN loss).

Normalisation: ``norm_type="batch"`` (default, CT-GAN) or ``"instance"``. BatchNorm is CT-GAN's
choice and trains with its batch of 32; with the 1^3 bottleneck of ``depth=5`` a training-mode
forward needs a batch of at least 2. InstanceNorm is batch-independent (better for small batches and
for the batch-size-1 inference of a scan) but is undefined on the 1^3 bottleneck, so it is skipped
there (``depth=5``) — a documented deviation when ``"instance"`` is chosen.

Width: CT-GAN uses ``gf = df = 100`` (about 163 M generator parameters). The default here is
``gf = df = 32`` (about 17 M) so that the demo trains and runs on a CPU; pass ``gf=100`` for the
reference size. Keep the module path stable: saved pipelines record
``["m3d.models.pix2pix3d", "Pix2Pix3DGenerator"]``.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from torch import nn

from ..presets import PresetMixin

__all__ = ["Pix2Pix3DGenerator", "PatchDiscriminator3D", "GeneratorOutput", "make_norm", "same_conv"]

NORM_TYPES = ("batch", "instance", "none")
UPSAMPLE_MODES = ("nearest", "trilinear")


@dataclass
class GeneratorOutput(BaseOutput):
    """Output of the GAN generators: ``sample`` ``(B, out_channels, D, H, W)`` in [-1, 1]."""

    sample: torch.Tensor


def make_norm(norm_type: str, channels: int, spatial: int | None = None) -> nn.Module:
    """BatchNorm3d with CT-GAN's Keras settings, InstanceNorm3d (no affine, as CycleGAN), or identity.

    InstanceNorm on a 1-voxel map is undefined (zero variance): it is replaced by identity there.
    """
    if norm_type not in NORM_TYPES:
        raise ValueError(f"norm_type must be one of {NORM_TYPES}; got {norm_type!r}")
    if norm_type == "batch":
        return nn.BatchNorm3d(channels, eps=1e-3, momentum=0.2)
    if norm_type == "instance" and (spatial is None or spatial > 1):
        return nn.InstanceNorm3d(channels, affine=False, track_running_stats=False)
    return nn.Identity()


def same_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """Keras' ``Conv3D(kernel 4, stride 1, padding='same')``: pad 1 before and 2 after on each axis."""
    return nn.Sequential(nn.ConstantPad3d((1, 2, 1, 2, 1, 2), 0.0), nn.Conv3d(in_channels, out_channels, 4))


def _random_like(x: torch.Tensor, generator: torch.Generator | list[torch.Generator]) -> torch.Tensor:
    """Uniform [0, 1) noise shaped like ``x``, drawn from one generator or one per batch item."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
        parts = [torch.rand(x.shape[1:], generator=g, device=g.device, dtype=torch.float32) for g in generator]
        return torch.stack(parts).to(x.device, x.dtype)
    return torch.rand(x.shape, generator=generator, device=generator.device, dtype=torch.float32).to(x.device, x.dtype)


def seeded_dropout(
    x: torch.Tensor, rate: float, training: bool, generator: torch.Generator | list[torch.Generator] | None
) -> torch.Tensor:
    """Dropout at ``rate``: torch's in training; in eval mode none, unless ``generator`` is given: then a mask drawn
    from it (pix2pix's test-time noise, seeded by one generator or one per batch item)."""
    if rate <= 0 or not (training or generator is not None):
        return x
    if training:
        return F.dropout(x, rate, training=True)
    keep = (_random_like(x, generator) >= rate).to(x.dtype)
    return x * keep / (1 - rate)


def upsample(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Resize ``x`` by 2 on each spatial axis, by nearest-neighbour copies (CT-GAN) or trilinearly."""
    if mode == "trilinear":
        return F.interpolate(x, scale_factor=2.0, mode="trilinear", align_corners=False)
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


class _UpLayer(nn.Module):
    """CT-GAN's ``deconv3d``: upsample x2 -> conv 4^3 'same' -> ReLU -> dropout -> norm."""

    def __init__(self, in_channels: int, out_channels: int, norm: nn.Module, dropout: float, upsample_mode: str):
        super().__init__()
        self.conv = same_conv(in_channels, out_channels)
        self.dropout = dropout
        self.norm = norm
        self.upsample_mode = upsample_mode

    def forward(self, x: torch.Tensor, dropout_generator=None) -> torch.Tensor:
        x = F.relu(self.conv(upsample(x, self.upsample_mode)))
        return self.norm(seeded_dropout(x, self.dropout, self.training, dropout_generator))


class Pix2Pix3DGenerator(PresetMixin, ModelMixin, ConfigMixin):
    """CT-GAN's 3-D U-Net generator (see module doc).

    Args:
        in_channels: 1 (the masked cube, as CT-GAN), 2 (masked cube + hole mask) or 3 (+ the mask of the nodule
            to draw, `m3d.tamper.nodule_shape`).
        out_channels: 1.
        gf: filters of the first layer (CT-GAN: 100; default 32 for CPU demos).
        depth: encoder layers; 5 takes a 32^3 cube to 1^3 as CT-GAN; the input size must be
            divisible by ``2 ** depth``.
        norm_type: ``"batch"`` (CT-GAN) or ``"instance"``.
        dropout: decoder dropout rate (CT-GAN / pix2pix: 0.5), active in training mode only unless a
            ``dropout_generator`` is given to ``forward``.
        sample_size: the cube's edge in voxels (32).
        upsample_mode: ``"nearest"`` (CT-GAN) or ``"trilinear"`` (no period-2 texture).
        input_skip: concatenate the input itself to the last upsampled features, before the output convolution: a
            full-resolution path (CT-GAN's U-Net has none: its first layer halves the resolution, so every output
            voxel is drawn from 16^3 features and, upsampled trilinearly, no edge is sharper than 2 voxels; with a
            nodule mask as input the nodule's margin can follow it voxel by voxel).
    """

    # "reference": CT-GAN's gf = 100 and nearest-neighbour upsampling; "default" and "demo" upsample trilinearly
    # (no period-2 texture)
    presets = {
        "reference": dict(gf=100),
        "default": dict(upsample_mode="trilinear"),
        "demo": dict(gf=8, upsample_mode="trilinear"),
        "tiny": dict(gf=4),
    }

    @register_to_config
    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        gf: int = 32,
        depth: int = 5,
        norm_type: str = "batch",
        dropout: float = 0.5,
        sample_size: int = 32,
        upsample_mode: str = "nearest",
        input_skip: bool = False,
    ):
        super().__init__()
        if upsample_mode not in UPSAMPLE_MODES:
            raise ValueError(f"upsample_mode must be one of {UPSAMPLE_MODES}; got {upsample_mode!r}")
        if depth < 2:
            raise ValueError(f"depth must be at least 2; got {depth}")
        if sample_size % 2**depth:
            raise ValueError(f"sample_size {sample_size} must be divisible by 2**depth = {2**depth}")
        widths = [gf * min(2**i, 8) for i in range(depth)]
        self.down = nn.ModuleList()
        previous = in_channels
        for i, width in enumerate(widths):
            spatial = sample_size // 2 ** (i + 1)
            norm = nn.Identity() if i == 0 else make_norm(norm_type, width, spatial)
            self.down.append(
                nn.Sequential(nn.Conv3d(previous, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2), norm)
            )
            previous = width
        self.up = nn.ModuleList()
        for i in reversed(range(depth - 1)):
            spatial = sample_size // 2 ** (i + 1)
            self.up.append(
                _UpLayer(previous, widths[i], make_norm(norm_type, widths[i], spatial), dropout, upsample_mode)
            )
            previous = 2 * widths[i]  # after concatenating the skip
        self.conv_out = same_conv(previous + (in_channels if input_skip else 0), out_channels)

    def forward(
        self,
        sample: torch.Tensor,
        dropout_generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> GeneratorOutput | tuple[torch.Tensor]:
        """Fill the masked cube ``sample`` ``(B, in_channels, D, H, W)``; returns values in [-1, 1].

        ``dropout_generator`` turns on seeded decoder dropout in eval mode (pix2pix's test-time noise).
        """
        if sample.ndim != 5:
            raise ValueError(f"sample must be (B, C, D, H, W); got shape {tuple(sample.shape)}")
        factor = 2**self.config.depth
        if any(n % factor for n in sample.shape[2:]):
            raise ValueError(f"spatial size {tuple(sample.shape[2:])} must be divisible by {factor}")
        skips = []
        h = sample
        for layer in self.down:
            h = layer(h)
            skips.append(h)
        skips.pop()  # the bottleneck itself
        for layer in self.up:
            h = torch.cat([layer(h, dropout_generator), skips.pop()], dim=1)
        h = upsample(h, self.config.upsample_mode)
        if self.config.input_skip:
            h = torch.cat([h, sample], dim=1)
        out = torch.tanh(self.conv_out(h))
        if not return_dict:
            return (out,)
        return GeneratorOutput(sample=out)


class PatchDiscriminator3D(PresetMixin, ModelMixin, ConfigMixin):
    """CT-GAN's 3-D PatchGAN discriminator (see module doc).

    Args:
        in_channels: 2 for the conditional pix2pix discriminator (candidate + masked condition), 1 for
            an unconditional one (CycleGAN).
        df: filters of the first layer (CT-GAN: 100; default 32).
        n_layers: stride-2 layers; 4 gives a 2^3 patch map for a 32^3 cube (CT-GAN).
        norm_type: ``"batch"`` (CT-GAN) or ``"instance"`` (CycleGAN).
        activation_before_norm: CT-GAN applies LeakyReLU before the norm; pix2pix/CycleGAN after.

    ``forward(sample, condition=None)`` returns the raw patch scores ``(B, 1, d, h, w)``.
    """

    presets = {"reference": dict(df=100), "default": {}, "demo": dict(df=8), "tiny": dict(df=4)}

    @register_to_config
    def __init__(
        self,
        in_channels: int = 2,
        df: int = 32,
        n_layers: int = 4,
        norm_type: str = "batch",
        activation_before_norm: bool = True,
        sample_size: int = 32,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for i in range(n_layers):
            width = df * min(2**i, 8)
            spatial = sample_size // 2 ** (i + 1)
            norm = nn.Identity() if i == 0 else make_norm(norm_type, width, spatial)
            conv = nn.Conv3d(previous, width, 4, stride=2, padding=1)
            act = nn.LeakyReLU(0.2)
            layers += [conv, act, norm] if activation_before_norm else [conv, norm, act]
            previous = width
        layers.append(same_conv(previous, 1))
        self.model = nn.Sequential(*layers)

    def forward(self, sample: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:
            sample = torch.cat([sample, condition], dim=1)
        if sample.shape[1] != self.config.in_channels:
            raise ValueError(
                f"discriminator expects {self.config.in_channels} input channels (candidate"
                f"{' + condition' if self.config.in_channels > 1 else ''}); got {sample.shape[1]}"
            )
        return self.model(sample)
