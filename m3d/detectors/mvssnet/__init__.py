"""MVSS-Net (Chen et al., ICCV 2021)."""

from .configuration_mvssnet import MVSSNetConfig
from .modeling_mvssnet import MVSSNetForForgeryDetection, mask_boundary, sobel_kernels

__all__ = ["MVSSNetConfig", "MVSSNetForForgeryDetection", "mask_boundary", "sobel_kernels"]
