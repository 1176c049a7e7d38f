"""U-Net (Ronneberger et al., MICCAI 2015) as a manipulation localizer."""

from .configuration_unet import UNetConfig
from .modeling_unet import UNetForForgeryDetection

__all__ = ["UNetConfig", "UNetForForgeryDetection"]
