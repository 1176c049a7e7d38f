"""Generator networks of the M3Dsynth attacks (diffusers `ModelMixin` + `ConfigMixin`).

One file each; the module paths are recorded in saved pipelines' ``model_index.json`` and must stay:
``m3d.models.unet3d.UNet3DModel`` (DDPM denoiser), ``m3d.models.pix2pix3d.Pix2Pix3DGenerator`` /
``PatchDiscriminator3D`` (CT-GAN), ``m3d.models.cyclegan3d.CycleGAN3DGenerator`` /
``CycleGAN3DDiscriminator``.

`PRESETS` holds the reference and the tiny (test) configurations of each network.
"""

from .cyclegan3d import CycleGAN3DDiscriminator, CycleGAN3DGenerator
from .pix2pix3d import GeneratorOutput, PatchDiscriminator3D, Pix2Pix3DGenerator
from .unet3d import UNet3DModel, UNet3DOutput

# "reference": the sizes of the papers (CT-GAN's gf = df = 100 and nearest-neighbour upsampling, CycleGAN's
# ngf = 64, a Med-DDPM-like U-Net); "default": the class defaults (modest widths that train on a CPU), with
# Pix2Pix upsampling trilinearly (no period-2 texture); "demo": the shipped demo pipelines' sizes, which train
# to plausible nodules in minutes to an hour on a 2-core CPU (`m3d.train.demo_pipelines`); "tiny": unit tests.
PRESETS: dict[str, dict[str, dict]] = {
    "UNet3DModel": {
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
    },
    "Pix2Pix3DGenerator": {
        "reference": dict(gf=100),
        "default": dict(upsample_mode="trilinear"),
        "demo": dict(gf=8, upsample_mode="trilinear"),
        "tiny": dict(gf=4),
    },
    "PatchDiscriminator3D": {"reference": dict(df=100), "default": {}, "demo": dict(df=8), "tiny": dict(df=4)},
    "CycleGAN3DGenerator": {
        "reference": dict(ngf=64, n_blocks=6),
        "default": {},
        "demo": dict(ngf=8, n_blocks=3),
        "tiny": dict(ngf=4, n_blocks=2),
    },
    "CycleGAN3DDiscriminator": {"reference": dict(df=64), "default": {}, "demo": dict(df=8), "tiny": dict(df=4)},
}

__all__ = [
    "CycleGAN3DDiscriminator",
    "CycleGAN3DGenerator",
    "GeneratorOutput",
    "PRESETS",
    "PatchDiscriminator3D",
    "Pix2Pix3DGenerator",
    "UNet3DModel",
    "UNet3DOutput",
]
