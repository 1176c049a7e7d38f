"""Generator networks of the M3Dsynth attacks (diffusers `ModelMixin` + `ConfigMixin`).

One file each; the module paths are recorded in saved pipelines' ``model_index.json`` and must stay:
``m3d.models.unet3d.UNet3DModel`` (DDPM denoiser), ``m3d.models.pix2pix3d.Pix2Pix3DGenerator`` /
``PatchDiscriminator3D`` (CT-GAN), ``m3d.models.cyclegan3d.CycleGAN3DGenerator`` /
``CycleGAN3DDiscriminator``.

Each network has its sizes as presets (`m3d.presets`): ``Network.from_preset(name)`` with ``name`` one of
"reference" (the papers'), "default" (the class defaults), "demo" (the shipped demo pipelines', which train to
plausible nodules in minutes to an hour on a 2-core CPU: `m3d.train.demo_pipelines`) and "tiny" (unit tests).
"""

from .cyclegan3d import CycleGAN3DDiscriminator, CycleGAN3DGenerator
from .pix2pix3d import GeneratorOutput, PatchDiscriminator3D, Pix2Pix3DGenerator
from .unet3d import UNet3DModel, UNet3DOutput

__all__ = [
    "CycleGAN3DDiscriminator",
    "CycleGAN3DGenerator",
    "GeneratorOutput",
    "PatchDiscriminator3D",
    "Pix2Pix3DGenerator",
    "UNet3DModel",
    "UNet3DOutput",
]
