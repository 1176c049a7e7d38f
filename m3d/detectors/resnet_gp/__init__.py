"""The general-purpose real/fake detector of Corvi et al. (ICASSP 2023) and the shared ResNet backbone."""

from .configuration_resnet_gp import ResNetGPConfig
from .modeling_resnet_gp import ResNetBackbone, ResNetGPForForgeryDetection

__all__ = ["ResNetBackbone", "ResNetGPConfig", "ResNetGPForForgeryDetection"]
